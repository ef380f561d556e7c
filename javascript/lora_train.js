// LoRA Train: keep the Train tab's status, loss chart and previews current while it is on screen.
// The WebUI loads this file into every page; the standalone server runs it from the page's load event.
// The page root the WebUI (gradioApp) or gradio itself renders into.
window.loraTrainRoot = function () {
    if (typeof gradioApp === "function") return gradioApp();
    var app = document.querySelector("gradio-app");
    return app && app.shadowRoot ? app.shadowRoot : document;
};

(function () {
    if (window.loraTrainPolling) return;
    window.loraTrainPolling = true;
    var root = window.loraTrainRoot;
    var quiet = 0;
    setInterval(function () {
        var r = root();
        var status = r.querySelector("#lora_train_status");
        var button = r.querySelector("#lora_train_refresh");
        if (!status || !button || status.offsetParent === null) return; // tab not on screen
        var state = status.querySelector("#lora_train_state");
        var phase = state ? state.getAttribute("data-phase") : "idle";
        var active = phase === "queued" || phase === "preparing" || phase === "training";
        // while a run is active every 1.5 s; otherwise every 6 s, so a run started elsewhere still shows up
        quiet = active ? 0 : quiet + 1;
        if (active || quiet % 4 === 0) button.click();
    }, 1500);
})();

// "Previews from the txt2img tab's settings": Start passes what the txt2img tab shows right now as
// its last input (a hidden textbox). Outside the WebUI there is no txt2img tab and it stays empty.
// gradio calls this with the inputs followed by the current values of the outputs; Start and Add to
// queue have one output (the message), which is dropped, as the WebUI's own submit() does.
window.loraTrainReadTxt2img = function () {
    var args = Array.prototype.slice.call(arguments);
    var r = typeof gradioApp === "function" ? gradioApp() : document;
    function val(selectors) {
        for (var i = 0; i < selectors.length; i++) {
            var el = r.querySelector(selectors[i]);
            if (el && el.value !== undefined && el.value !== "") return el.value;
        }
        return null;
    }
    args = args.slice(0, args.length - 1);
    var prompt = val(["#txt2img_prompt textarea"]);
    if (prompt === null) return args;
    args[args.length - 1] = JSON.stringify({
        prompt: prompt,
        negative_prompt: val(["#txt2img_neg_prompt textarea"]) || "",
        steps: val(["#txt2img_steps input[type=number]", "#txt2img_steps input"]),
        sampler_name: val(["#txt2img_sampling input"]),
        cfg_scale: val(["#txt2img_cfg_scale input[type=number]", "#txt2img_cfg_scale input"]),
        seed: val(["#txt2img_seed input", "#script_txt2img_seed_seed input", "#script_txt2img_seed input"]),
        width: val(["#txt2img_width input[type=number]", "#txt2img_width input"]),
        height: val(["#txt2img_height input[type=number]", "#txt2img_height input"])
    });
    return args;
};

// Dataset tab keys, when no text field has the focus: ←/→ pick the previous/next image, PageUp/
// PageDown turn the gallery page, Ctrl+Z / Ctrl+Y (or Ctrl+Shift+Z) undo/redo, Ctrl+S saves.
(function () {
    if (window.loraDatasetKeys) return;
    window.loraDatasetKeys = true;
    var root = window.loraTrainRoot;
    function click(id) {
        var el = root().querySelector("#" + id);
        if (el) el.click();
        return !!el;
    }
    document.addEventListener("keydown", function (e) {
        var r = root();
        var gallery = r.querySelector("#lora_dataset_gallery");
        if (!gallery || gallery.offsetParent === null) return; // the Dataset tab is not on screen
        var t = e.target;
        var typing = t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.isContentEditable);
        if (typing) return;
        var key = e.key.toLowerCase();
        var handled = false;
        if ((e.ctrlKey || e.metaKey) && key === "z") handled = click(e.shiftKey ? "lora_dataset_redo" : "lora_dataset_undo");
        else if ((e.ctrlKey || e.metaKey) && key === "y") handled = click("lora_dataset_redo");
        else if ((e.ctrlKey || e.metaKey) && key === "s") handled = click("lora_dataset_save");
        else if (e.key === "PageDown") handled = click("lora_dataset_next");
        else if (e.key === "PageUp") handled = click("lora_dataset_prev");
        else if (e.key === "ArrowRight" || e.key === "ArrowLeft") {
            var items = Array.prototype.slice.call(gallery.querySelectorAll(".thumbnail-item"));
            if (items.length) {
                var at = items.findIndex(function (el) { return el.classList.contains("selected"); });
                var next = e.key === "ArrowRight" ? Math.min(items.length - 1, at + 1) : Math.max(0, at < 0 ? 0 : at - 1);
                items[next].click();
                handled = true;
            }
        }
        if (handled) e.preventDefault();
    });
})();
