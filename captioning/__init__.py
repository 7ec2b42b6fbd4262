"""Caption Folder without ComfyUI: listing (``listing``), the one commit point and caption reads (``commit``), the
ledger of folder runs (``ledger``), text cleanup and composition (``cleanup``), metadata.jsonl (``metadata``) and
the run loop (``run``). Import what you need from here.
"""

from .cleanup import clean_caption, compose_caption, cut_repeats, render_prompt, structured_caption
from .commit import CAPTION_READ_LIMIT, CaptionFileError, read_caption, write_caption
from .ledger import LEDGER_DIR_ENV, Ledger, ledger_dir, reset_folder_ledgers
from .listing import IMAGE_EXTENSIONS, caption_collisions, caption_path, is_video_file, list_images
from .metadata import METADATA_READ_LIMIT, load_metadata, metadata_name, read_metadata, update_metadata
from .options import (
    CAPTION_EXTENSIONS,
    EMPTY_ANSWER,
    EXISTING_MODES,
    METADATA_NAME,
    CaptionOptions,
    CaptionResult,
    folder_from_input,
    options_from_settings,
    resolve_caption_options,
    summarize,
)
from .run import (
    CHUNK,
    FolderInterrupted,
    Transform,
    caption_folder,
    open_ledger,
    pending_digest,
    plan_folder,
    remember_settled,
)

__all__ = [
    "CAPTION_EXTENSIONS", "CAPTION_READ_LIMIT", "CHUNK", "EMPTY_ANSWER", "EXISTING_MODES", "IMAGE_EXTENSIONS",
    "LEDGER_DIR_ENV", "METADATA_NAME", "METADATA_READ_LIMIT", "CaptionFileError", "CaptionOptions", "CaptionResult",
    "FolderInterrupted", "Ledger", "Transform", "caption_collisions", "caption_folder", "caption_path",
    "clean_caption", "compose_caption", "cut_repeats", "is_video_file", "ledger_dir", "list_images",
    "load_metadata", "metadata_name", "open_ledger", "pending_digest", "plan_folder", "read_caption",
    "read_metadata", "remember_settled", "render_prompt",
    "reset_folder_ledgers", "resolve_caption_options", "structured_caption", "summarize",
    "update_metadata", "write_caption", "folder_from_input", "options_from_settings",
]
