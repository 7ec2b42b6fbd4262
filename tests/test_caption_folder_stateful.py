"""Caption Folder under random sequences of queued runs (Hypothesis stateful testing, issue 27).

The real node class with a server-backend handle, real files in a real folder, a scripted OpenAI-compatible server
on loopback whose every answer is unique (``ansN``) and ends as the test draws it: complete, cut at max_tokens,
an in-band error, a stream with no finish (garbage), or slow. Between runs files are added, removed or corrupted.
After every step, against a model of what the folder must hold:

- no caption holds an incomplete answer (a cut, errored or unfinished one);
- a caption changes only by a complete answer given to that file in that run (overwrite: it becomes exactly that
  answer; append / prepend: the old text gains it once);
- every answer appears in at most one caption, at most once; every file is appended to at most once per mode;
- ``limit``: a run never answers more than ``limit`` files, and never a file already done in that mode;
- nothing is written outside the folder, no temporary file is left, caption modes are kept (0640 stays 0640,
  new ones get 0644 under umask 022).
"""

from __future__ import annotations

import os
import re
import stat
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test
from scripted_server import Reply, ScriptedServer, first_pixel

from qwenvl_fast import qwenvl_loader as ql

BEHAVIOURS = ["complete", "cut", "error", "garbage", "slow"]
ANSWER = re.compile(r"(ans|cut|err|gar)\d+")


def _reply(server: ScriptedServer, body: dict) -> Reply:
    server.count += 1
    n = server.count
    behaviour = server.plan[(first_pixel(body)[0] + n) % len(server.plan)] if server.plan else "complete"
    server.given.append((first_pixel(body)[0], f"ans{n}" if behaviour in ("complete", "slow") else None))
    if behaviour == "slow":
        threading.Event().wait(0.05)
    if behaviour == "cut":
        return Reply([f"cut{n}"], finish_reason="length")
    if behaviour == "error":
        return Reply([f"err{n}"], error="boom")
    if behaviour == "garbage":
        return Reply([f"gar{n}"], finish_reason=None, done=False)
    return Reply([f"ans{n}"])


@pytest.fixture(scope="module")
def server():
    s = ScriptedServer(_reply)
    s.count, s.plan, s.given = 0, [], []
    yield s.start()
    s.stop()


class CaptionFolderMachine(RuleBasedStateMachine):
    server: ScriptedServer
    root: Path

    @initialize()
    def setup(self):
        from qwenvl_fast import nodes

        self.nodes = nodes
        self.case = Path(self.root) / f"case{CaptionFolderMachine.cases}"
        CaptionFolderMachine.cases += 1
        self.folder = self.case / "pics"
        self.folder.mkdir(parents=True)
        (self.case / "outside.txt").write_text("untouched", encoding="utf-8")
        os.environ["QWENVL_FAST_LEDGER_DIR"] = str(self.case.parent / f"{self.case.name}-ledgers")
        (self.handle,) = nodes.QwenVLFastLoadModel().load(
            model="(served)", quantization="none", attention_mode="auto", dtype="auto", device="auto",
            compile_vision="off", keep_model_loaded=True, backend="server", server_url=self.server.url,
            server_max_in_flight=2, server_retries=0)
        self.next_colour = 1
        self.colour: dict[str, int] = {}  # file name -> its red channel (what the server sees)
        self.caption: dict[str, str] = {}  # the model: caption text per image name
        self.modes: dict[str, int] = {}
        self.appended: dict[tuple[str, str, int], int] = {}  # (mode, name, generation) -> appends
        self.generation: dict[str, int] = {}  # bumped when the image is replaced
        for _ in range(3):
            self._add()

    def _add(self, with_caption: str | None = None, mode: int = 0o644) -> None:
        from PIL import Image

        name = f"img{self.next_colour:03d}.png"
        Image.new("RGB", (24, 24), (self.next_colour, 30, 60)).save(self.folder / name)
        self.colour[name] = self.next_colour
        self.generation[name] = self.generation.get(name, 0) + 1
        self.next_colour += 1
        if with_caption is not None:
            txt = self.folder / name.replace(".png", ".txt")
            txt.write_text(with_caption, encoding="utf-8")
            txt.chmod(mode)
            self.caption[name] = with_caption
            self.modes[name] = mode

    @rule(caption=st.sampled_from([None, "a hand caption", "p: an earlier one"]), mode=st.sampled_from([0o644, 0o640]))
    def add_file(self, caption, mode):
        if len(self.colour) < 6:
            self._add(caption, mode)

    @rule(data=st.data())
    def remove_file(self, data):
        if not self.colour:
            return
        name = data.draw(st.sampled_from(sorted(self.colour)))
        (self.folder / name).unlink()
        del self.colour[name]

    @rule(data=st.data())
    def corrupt_file(self, data):
        if not self.colour:
            return
        name = data.draw(st.sampled_from(sorted(self.colour)))
        (self.folder / name).write_bytes(b"not a picture any more")
        self.generation[name] += 1

    @rule(existing=st.sampled_from(["skip", "overwrite", "append", "prepend"]), limit=st.integers(0, 3),
          prefix=st.sampled_from(["", "p: "]), plan=st.lists(st.sampled_from(BEHAVIOURS), min_size=1, max_size=4))
    def queue(self, existing, limit, prefix, plan):
        self.server.plan, self.server.given = plan, []
        before = {name: self._read(name) for name in self.colour}
        out = self.nodes.QwenVLFastCaptionFolder().caption(
            qwenvl_model=self.handle, folder=str(self.folder), prompt="Caption.", image_quality="fast",
            max_new_tokens=16, write_txt=True, overwrite=False, seed=0, existing=existing, limit=limit, prefix=prefix)
        statuses = dict(line.split(": ", 1) for line in out["ui"]["text"][1:] if ": " in line)
        complete = {colour: answer for colour, answer in self.server.given if answer}
        if limit:  # one request per file answered (no retries): never more than the limit
            assert len(self.server.given) <= limit, statuses
        for name in self.colour:
            after = self._read(name)
            status = statuses.get(name, "")
            if after == before[name]:
                continue
            assert status == "written", (name, status, before[name], after)
            answer = complete[self.colour[name]]
            old = before[name] or ""
            if existing == "overwrite" or not old.strip():
                assert after == prefix + answer, (after, prefix, answer)
            else:
                assert after.count(answer) == 1 and len(after) > len(answer), (old, after)
                key = (existing, prefix, name, self.generation[name])  # the settings that define "done"
                self.appended[key] = self.appended.get(key, 0) + 1
                assert self.appended[key] == 1, f"{name} appended to twice in {existing} mode"
            self.caption[name] = after

    def _read(self, name: str) -> str | None:
        txt = self.folder / name.replace(".png", ".txt")
        try:
            return txt.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    @invariant()
    def folder_holds_only_complete_answers_once_each(self):
        if not hasattr(self, "folder"):
            return
        seen: list[str] = []
        for txt in self.folder.glob("*.txt"):
            found = [m.group(0) for m in ANSWER.finditer(txt.read_text(encoding="utf-8"))]
            assert all(a.startswith("ans") for a in found), (txt.name, found)
            seen += found
            mode = stat.S_IMODE(txt.stat().st_mode)
            assert mode == self.modes.get(txt.name.replace(".txt", ".png"), 0o644), (txt.name, oct(mode))
        assert len(seen) == len(set(seen)), seen
        assert not [p for p in self.folder.iterdir() if p.name.startswith(".")]  # no temporary files
        assert sorted(p.name for p in self.case.iterdir()) == ["outside.txt", "pics"]
        assert (self.case / "outside.txt").read_text(encoding="utf-8") == "untouched"

    def teardown(self):
        ql.MANAGER.release()


CaptionFolderMachine.cases = 0


def test_caption_folder_state_machine(server, tmp_path, monkeypatch):
    monkeypatch.setenv("QWENVL_FAST_LEDGER_DIR", str(tmp_path / "ledgers"))
    old_umask = os.umask(0o022)
    CaptionFolderMachine.server = server
    CaptionFolderMachine.root = tmp_path
    try:
        ci = os.environ.get("QWENVL_FAST_HYPOTHESIS", "ci") == "ci"
        run = settings(max_examples=12 if ci else settings.default.max_examples,
                       stateful_step_count=8, deadline=None,
                       suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
        run_state_machine_as_test(CaptionFolderMachine, settings=run)
    finally:
        os.umask(old_umask)
