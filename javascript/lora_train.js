// LoRA Train: keep the Train tab's status, loss chart and previews current while it is on screen.
// The WebUI loads this file into every page; the standalone server runs it from the page's load event.
(function () {
    if (window.loraTrainPolling) return;
    window.loraTrainPolling = true;
    function root() {
        if (typeof gradioApp === "function") return gradioApp();
        var app = document.querySelector("gradio-app");
        return app && app.shadowRoot ? app.shadowRoot : document;
    }
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
