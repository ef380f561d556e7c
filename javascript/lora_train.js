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
