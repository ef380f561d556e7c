"""Preview prompts that a GUI config holds as text (kohya_ss' `sample_prompts`, lora-scripts' prompt
form): written to a file, as those GUIs do before they start sd-scripts, which reads only a file."""

from __future__ import annotations

from pathlib import Path

from lora_train.errors import UserError, msg


def write_prompt_file(text: str, output_dir: str | None, source: str) -> Path:
    """`<output_dir>/sample/prompt.txt` (kohya_ss' place for it), holding `text`."""
    path = (Path(str(output_dir or ".")) / "sample" / "prompt.txt").resolve()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise UserError(msg("{source}: sample_prompts: cannot write {path} ({error})", source=source, path=path, error=e)) from e
    return path
