"""The Train tab in plain gradio 3.41: served by the WebUI (scripts/lora_train_tab.py) and by
`python -m lora_train ui` (app.py) over the same RunManager and a Host."""
