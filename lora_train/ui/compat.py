"""Every difference between gradio 3.41 (AUTOMATIC1111's WebUI) and gradio 4.40 (Forge) that the tabs
meet, in one place: the rest of ui/ is written once and calls these where the two disagree.

What differs, and where it is handled:
- an event's page-side function: `_js=` in 3.x, `js=` in 4.x (`js`, `load_js`);
- the queue's worker count: `concurrency_count` in 3.x; 4.x limits each event instead and refuses
  `concurrency_count` (`queue`);
- the events a built Blocks holds (read by the tests): 3.x keeps `fns` and `dependencies` as two
  parallel lists (targets as ids, `trigger_after` an index), 4.x one dict of BlockFunction (targets as
  (id, event) pairs, `trigger_after` a function id) (`listeners`).
What the two share is used as it is: gr.update, the components' constructors and their arguments
(Gallery columns/height, Dropdown type="index", choices as (label, value) pairs), .then, .select's
SelectData.index, show_progress=False (both read it as "hidden"), gr.Progress.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import gradio as gr

GRADIO_MAJOR = int(gr.__version__.split(".")[0])
GRADIO_4 = GRADIO_MAJOR >= 4


def js(function: str) -> dict[str, str]:
    """The keyword argument that runs `function` (JavaScript: a global function's name or an arrow
    function's source) in the page before the event reaches the server: `.click(fn, ..., **js("f"))`."""
    return {"js": function} if GRADIO_4 else {"_js": function}


def load_js(blocks: gr.Blocks, function: str) -> None:
    """Run `function` in the page once it has loaded (the standalone server's page script)."""
    blocks.load(None, None, None, **js(function))


def queue(blocks: gr.Blocks, concurrency: int) -> gr.Blocks:
    """Let `concurrency` events run at once (a refresh while a button's handler still runs)."""
    if GRADIO_4:
        return blocks.queue(default_concurrency_limit=concurrency)
    return blocks.queue(concurrency_count=concurrency)


@dataclass
class Listener:
    """One event of a built Blocks, the same under both versions."""
    fn: Optional[Callable[..., Any]]
    targets: list[int]  # the ids of the components whose event runs it
    event: str  # "click", "change", ...; "then" for one that follows another
    inputs: list[int]
    outputs: list[int]
    js: Optional[str]
    after: Optional[int]  # the index (in listeners()) of the listener this one follows (.then)


def listeners(blocks: gr.Blocks) -> list[Listener]:
    """The events `blocks` holds, in the order they were wired."""
    if GRADIO_4:
        out: list[Listener] = []
        index = {}
        for f in blocks.fns.values():
            index[f._id] = len(out)
            after = index.get(f.trigger_after) if f.trigger_after is not None else None
            event = f.targets[0][1] if f.targets else "load"
            # as 3.x has them: a .then runs on its first event's component, the page's load on none
            targets = (list(out[after].targets) if event == "then" and after is not None else
                       [] if event == "load" else [t[0] for t in f.targets])
            out.append(Listener(f.fn, targets, event, [b._id for b in f.inputs], [b._id for b in f.outputs], f.js, after))
        return out
    return [Listener(f.fn, list(d["targets"]), d["trigger"], list(d["inputs"]), list(d["outputs"]), d["js"], d["trigger_after"])
            for f, d in zip(blocks.fns, blocks.dependencies)]
