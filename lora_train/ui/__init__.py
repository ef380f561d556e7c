"""The LoRA Train tabs in plain gradio, one source for gradio 3.41 (AUTOMATIC1111's WebUI) and 4.40
(Forge), what differs kept in compat.py: served by the WebUI (scripts/lora_train_tab.py) and by
`python -m lora_train ui` (app.py) over the same RunManager and a Host."""
