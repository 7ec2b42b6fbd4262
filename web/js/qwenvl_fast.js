// Qwen-VL Fast: each node shows its result (answer, timing line, warnings; Caption Folder's summary; Cache Info's
// figures) in a read-only text box on the node, and keeps showing it after a page reload and when ComfyUI serves
// the run from its cache. Plain JS, no build step. The Python side composes the lines (nodes.py "ui" dicts).
import { api } from "../../../scripts/api.js";
import { app } from "../../../scripts/app.js";
import { ComfyWidgets } from "../../../scripts/widgets.js";

const PACK_NODES = new Set([
    "QwenVLFast_Ask", "QwenVLFast_Run", "QwenVLFast_Generate", "QwenVLFast_CaptionFolder", "QwenVLFast_CacheInfo",
]);
const WIDGET_NAME = "qwenvl_fast_result";
// Kept in the node's properties (saved with the workflow), not in widgets_values: values are matched to widgets
// by position, so an extra value would shift nothing today but would sit where a future optional input goes.
const PROPERTY = "qwenvl_fast_result";
// Results kept in node properties travel with every saved workflow, and so inside every PNG ComfyUI saves
// afterwards: a shared picture shares the last answers. The owner turns that off here (SECURITY.md).
const KEEP_SETTING = "QwenVLFast.KeepResultsInWorkflow";
const KEEP_SETTING_NAME = "Qwen-VL Fast: keep the last results in saved workflows (and so in every saved PNG)";
const KEEP_SETTING_TIP = "Off: each node still shows its result, but it is not saved with the workflow, not in " +
    "the PNGs ComfyUI saves, and not shown again after a reload.";

function keepResults() {
    try {
        const modern = app.extensionManager?.setting?.get;
        const value = modern ? app.extensionManager.setting.get(KEEP_SETTING)
            : app.ui?.settings?.getSettingValue?.(KEEP_SETTING, true);
        return value !== false;
    } catch (error) {
        console.debug("QwenVL-Fast: settings not readable", error);
        return true;
    }
}

// What a node saves when results are not kept: no property, and an empty value in the result box's place (older
// frontends save every widget's value by position, whatever the widget's serialize flag says).
function forgetResults(node, data) {
    if (data?.properties) delete data.properties[PROPERTY];
    const index = node.widgets?.findIndex((w) => w.name === WIDGET_NAME) ?? -1;
    if (index >= 0 && Array.isArray(data?.widgets_values) && index < data.widgets_values.length) {
        data.widgets_values[index] = "";
    }
}

// Turned off: the results already kept in the open workflow go too.
function dropKeptResults(keep) {
    if (keep !== false) return;
    for (const node of app.graph?._nodes ?? []) {
        if (PACK_NODES.has(node.type) && node.properties) delete node.properties[PROPERTY];
    }
    markWorkflowChanged();
}

function strings(message, key) {
    const value = message?.[key];
    return Array.isArray(value) ? value.map((v) => String(v)) : [];
}

// The text a node shows for one run's ui dict.
function shownText(nodeName, message) {
    if (nodeName === "QwenVLFast_CaptionFolder") {
        return strings(message, "text").join("\n");  // its first line is the summary
    }
    if (nodeName === "QwenVLFast_CacheInfo") {
        return [...strings(message, "summary"), ...strings(message, "text")].join("\n");
    }
    const head = [...strings(message, "summary"), ...strings(message, "warnings").map((w) => "\u26a0 " + w)];
    const answers = strings(message, "text");
    const body = answers.length > 1 ? answers.map((t, i) => `[${i + 1}] ${t}`).join("\n\n") : (answers[0] ?? "");
    return [...head, "", body].join("\n");
}

const MIN_BOX_HEIGHT = 140;

function resultWidget(node, grow) {
    let widget = node.widgets?.find((w) => w.name === WIDGET_NAME);
    if (widget) return widget;
    const before = node.size ? [...node.size] : null;
    ComfyWidgets.STRING(node, WIDGET_NAME, ["STRING", { multiline: true }], app);
    // The node's own entry (some frontends keep a different object than the one ComfyWidgets returns).
    widget = node.widgets.find((w) => w.name === WIDGET_NAME);
    widget.serialize = false;  // not in widgets_values: workflows keep their widget positions
    if (widget.options) {
        widget.options.serialize = false;  // not sent to the server as an input
        widget.options.getMinHeight = () => MIN_BOX_HEIGHT;
    }
    const box = widget.inputEl ?? widget.element;
    if (box) {
        box.readOnly = true;
        box.style.opacity = "0.85";
        box.dataset.qwenvlFast = "result";  // for tests and user styles
        box.title = "Qwen-VL Fast: the last run's result (read-only)";
    }
    // Room for the box when it first appears; a restored node's saved size already has it.
    if (before && grow) node.setSize?.([before[0], before[1] + MIN_BOX_HEIGHT]);
    return widget;
}

// Tell the frontend the workflow changed, so that the saved copy (restored on reload) has the shown text. The
// frontend checks for changes on mouse and key events only; a run ending is neither. Older frontends save the
// graph every second on their own and have no change tracker.
function markWorkflowChanged() {
    try {
        const tracker = app.extensionManager?.workflow?.activeWorkflow?.changeTracker;
        const capture = tracker?.captureCanvasState ?? tracker?.checkState;
        capture?.call(tracker);
    } catch (error) {
        console.debug("QwenVL-Fast: no change tracker", error);
    }
}

function showOnNode(node, text, { restoring = false } = {}) {
    const widget = resultWidget(node, !restoring);
    widget.value = text;
    const box = widget.inputEl ?? widget.element;
    if (box && "value" in box) box.value = text;
    node.properties = node.properties ?? {};
    if (keepResults()) {
        node.properties[PROPERTY] = text;
    } else {
        delete node.properties[PROPERTY];
    }
    const wanted = node.computeSize?.();
    if (wanted && node.size && (wanted[1] > node.size[1] || wanted[0] > node.size[0])) {
        node.setSize?.([Math.max(node.size[0], wanted[0]), Math.max(node.size[1], wanted[1])]);
    }
    node.setDirtyCanvas?.(true, true);
    if (!restoring) markWorkflowChanged();
}

// A run served from ComfyUI's cache: newer servers send each cached node's ui dict again ("executed"); older ones
// (e.g. March 2024) only say which nodes were cached. Their ui dicts are in the prompt's /history entry once the
// prompt has finished, so a node loaded fresh (no saved result) still shows the cached run's result.
async function showCachedResults(promptId, nodeIds) {
    const ours = nodeIds.filter((id) => PACK_NODES.has(app.graph?.getNodeById?.(id)?.type));
    if (!promptId || ours.length === 0) return;
    for (let attempt = 0, waited = 0; waited < 15 * 60 * 1000; attempt++) {
        const delay = Math.min(250 * 1.5 ** attempt, 5000);
        await new Promise((resolve) => setTimeout(resolve, delay));
        waited += delay;
        let entry;
        try {
            const response = await api.fetchApi(`/history/${encodeURIComponent(promptId)}`);
            if (!response.ok) return;
            entry = (await response.json())?.[promptId];
        } catch (error) {
            console.debug("QwenVL-Fast: no history for a cached run", error);
            return;
        }
        if (!entry) continue;  // still running
        for (const id of ours) {
            const node = app.graph.getNodeById(id);
            const ui = entry.outputs?.[id];
            if (node && ui) showOnNode(node, shownText(node.type, ui));
        }
        return;
    }
}

const KEEP_SETTING_SPEC = {
    id: KEEP_SETTING,
    name: KEEP_SETTING_NAME,
    tooltip: KEEP_SETTING_TIP,
    type: "boolean",
    defaultValue: true,
    onChange: (value) => dropKeptResults(value),
};

app.registerExtension({
    name: "QwenVLFast.ShowResults",
    settings: [KEEP_SETTING_SPEC],  // frontends with a settings API (1.x); the March-2024 UI ignores it
    setup() {
        if (!app.extensionManager?.setting && app.ui?.settings?.addSetting) {
            app.ui.settings.addSetting(KEEP_SETTING_SPEC);  // the March-2024 UI
        }
        api.addEventListener("execution_cached", (event) => {
            const detail = event?.detail ?? {};
            showCachedResults(detail.prompt_id, (detail.nodes ?? []).map(String));
        });
    },
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (!PACK_NODES.has(nodeData?.name)) return;
        const nodeName = nodeData.name;

        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
            const result = onExecuted?.apply(this, arguments);
            try {
                showOnNode(this, shownText(nodeName, message));
            } catch (error) {
                console.warn("[QwenVL-Fast] could not show the result on the node", error);
            }
            return result;
        };

        const onSerialize = nodeType.prototype.onSerialize;
        nodeType.prototype.onSerialize = function (data) {
            const result = onSerialize?.apply(this, arguments);
            if (!keepResults()) forgetResults(this, data);
            return result;
        };

        const onConfigure = nodeType.prototype.onConfigure;
        nodeType.prototype.onConfigure = function () {
            const result = onConfigure?.apply(this, arguments);
            const saved = this.properties?.[PROPERTY];
            if (typeof saved === "string" && saved) {
                try {
                    showOnNode(this, saved, { restoring: true });
                } catch (error) {
                    console.warn("[QwenVL-Fast] could not restore the result on the node", error);
                }
            }
            return result;
        };
    },
});
