"""The run manager behind the Train tab: a queue of runs trained one at a time in a background thread.

It knows the host only through `lora_train.host.base.Host` and the front end only through
`snapshot()`, so the WebUI tab, the standalone server and the tests drive the same code.

Stop saves `<name>-interrupted` (with optimizer state) and pauses the queue; Resume continues the
last stopped or failed run from that state under the same name; Save now writes `<name>-step<N>`.
Every save is published into the host's LoRA folder with its card (see `network/card.py`).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from lora_train.app.guard import guard_config
from lora_train.errors import UserError, msg
from lora_train.host.base import Host
from lora_train.network.card import SD_VERSION, Card, free_stem, publish, set_preview, unique_name, unpublish
from lora_train.network.selftest import check_failed
from lora_train.train import events as ev, memory
from lora_train.train.config import TrainConfig

ENDED = ("finished", "cancelled", "failed", "refused")


@dataclass
class RunRequest:
    config: TrainConfig
    trigger: str = ""  # activation text on the card; also the default preview prompt
    preview_prompts: list[str] = field(default_factory=list)
    preferred_weight: float = 1.0
    notes: str = ""
    previews: bool = True  # preview images each epoch (from the prompts, else the trigger word)
    # called once the run has finished (not when stopped or failed), the model free again: work that
    # uses the finished file (the base-style step's NAME-distilled); its lines join the run's messages
    after: Optional[Callable[["RunStatus"], list[str]]] = None


@dataclass
class RunStatus:
    id: str
    name: str
    phase: str = "queued"  # queued | preparing | training | finished | cancelled | failed | refused
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    epochs: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, loss on the held-out images)
    # epoch -> (step, loss on the held-out images) at the end of that epoch: what `pick` ranks the saves by
    epoch_validation: dict[int, tuple[int, float]] = field(default_factory=dict)
    steps_per_second: float = 0.0
    eta_seconds: Optional[float] = None
    published: list[str] = field(default_factory=list)
    checks: dict[str, str] = field(default_factory=dict)  # published path -> the host's load check
    # after a run with validation_split: (file, epoch, validation loss) of each save, lowest loss first (`pick`'s
    # ranking; the file is the published copy), and the published file it suggests
    ranking: list[tuple[str, Optional[int], Optional[float]]] = field(default_factory=list)
    suggested: str = ""
    previews: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    error: str = ""
    work_dir: str = ""
    resume_state: Optional[str] = None  # the state folder Resume continues from
    trigger: str = ""  # the run's trigger word (the grid's default prompt)
    stopping: bool = False  # Stop was pressed; the run saves after the current step
    ended_at: Optional[float] = None  # time.time() when it finished, stopped, failed or was refused

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        # the end time comes with the ended phase: the tab may read the status between the two
        if name == "phase" and value in ENDED and getattr(self, "ended_at", None) is None:
            super().__setattr__("ended_at", time.time())

    @property
    def ended(self) -> bool:
        return self.phase in ENDED

    @property
    def last_loss(self) -> Optional[float]:
        return self.losses[-1][1] if self.losses else None


class RunManager:
    def __init__(self, host: Host):
        self.host = host
        self._lock = threading.RLock()
        self._queue: list[tuple[RunStatus, RunRequest]] = []
        self._runs: list[RunStatus] = []  # every run of this session, oldest first
        self._requests: dict[str, RunRequest] = {}
        self._current: Optional[RunStatus] = None
        self._cancel = threading.Event()
        self._trainer = None
        self._paused = False
        self._thread: Optional[threading.Thread] = None
        self._ids = itertools.count(1)
        self._idle = threading.Condition(self._lock)

    # -- commands --------------------------------------------------------------------------------
    def submit(self, request: RunRequest, start: bool = True) -> RunStatus:
        """Queue a run; with `start`, also un-pause the queue. Its name is made unique now."""
        config = copy.deepcopy(request.config)
        guard_config(config, self.host.access())  # before anything is queued, read or written
        _require_dataset(config)
        with self._lock:
            taken = {r.name for r in self._runs if r.phase not in ENDED}
            name = unique_name(self.host.lora_dir(), request.config.saving.output_name or "lora", taken)
            config.saving.output_name = name
            config.saving.output_dir = str(self.host.work_dir() / name)
            config.saving.resume = None
            status = RunStatus(id=self._new_id(), name=name, work_dir=config.saving.output_dir, trigger=request.trigger)
            self._enqueue(status, dataclasses.replace(request, config=config, preview_prompts=list(request.preview_prompts)), start)
            return status

    def resume(self, run_id: Optional[str] = None) -> RunStatus:
        """Continue a stopped or failed run from its last interrupted state, under the same name."""
        with self._lock:
            candidates = [r for r in self._runs if r.resume_state and (run_id is None or r.id == run_id)]
            if not candidates:
                raise UserError(msg("nothing to resume: no stopped or failed run has a saved state"))
            old = candidates[-1]
            if any(r.name == old.name and r.phase not in ENDED for r in self._runs):
                raise UserError(msg("'{name}' is already queued or running", name=old.name))
            request = copy.deepcopy(self._requests[old.id])
            request.config.saving.resume = old.resume_state
            status = RunStatus(id=self._new_id(), name=old.name, work_dir=old.work_dir, trigger=old.trigger)
            status.messages.append(msg("resuming from {state}", state=old.resume_state))
            # one history for the whole training: what the stopped run trained and saved stays in view
            status.losses = list(old.losses)
            status.validation, status.epoch_validation = list(old.validation), dict(old.epoch_validation)
            status.published, status.checks, status.previews = list(old.published), dict(old.checks), list(old.previews)
            old.resume_state = None  # resumed once; the new run saves its own state when stopped
            self._enqueue(status, request, True, front=True)  # it continues what was running
            return status

    def _sample_fn(self, config: TrainConfig, adapter, request: RunRequest, folder: Path):
        """The run's previews through the host (every epoch unless the config says when), or None."""
        prompts = (request.preview_prompts or ([request.trigger] if request.trigger else [])) if request.previews else []
        if prompts and not (config.sampling.sample_every_n_epochs or config.sampling.sample_every_n_steps):
            config.sampling.sample_every_n_epochs = 1
        return self.host.sample_fn(config, adapter, prompts, folder / "sample") if prompts else None

    def estimate(self, config: TrainConfig, request: Optional[RunRequest] = None) -> tuple[object, list[str]]:
        """The Train tab's Estimate: a few calibration steps on the host's model (or the cached
        result), between runs only; `request`'s previews are priced in. Returns the plan (epochs
        fitted to max_train_minutes) and the lines to show."""
        from lora_train.app import job

        with self._lock:
            if self._busy():
                raise UserError(msg("a run is training or queued: estimate when the queue is idle"))
        guard_config(config, self.host.access())
        refusals = self.host.preflight(config)
        if refusals:
            raise UserError("\n".join(refusals))
        with self.host.session(config, "estimate") as adapter:
            sample_fn = self._sample_fn(config, adapter, request, Path(config.saving.output_dir)) if request else None
            _, plan, lines = job.prepare_estimate(config, adapter, self.host.work_dir(), calibrate=True, sample_fn=sample_fn)
        return plan, lines

    def stop(self) -> bool:
        """Stop the current run (it saves and publishes `-interrupted`) and pause the queue."""
        with self._lock:
            self._paused = True
            if self._current is None:
                return False
            self._cancel.set()
            self._current.stopping = True
            return True

    def save_now(self) -> bool:
        with self._lock:
            if self._trainer is None:
                return False
            self._trainer.request_save()
            return True

    def start_queue(self) -> None:
        with self._lock:
            self._paused = False
            self._ensure_worker()

    def clear_queue(self) -> int:
        with self._lock:
            n = len(self._queue)
            for status, _ in self._queue:
                status.phase, status.error = "cancelled", msg("removed from the queue")
            self._queue.clear()
            return n

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stop everything and wait (the host is reloading its UI or exiting)."""
        self.clear_queue()
        self.stop()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def wait(self, timeout: float = 600.0) -> bool:
        """Block until nothing runs and nothing un-paused is queued (tests, CLI)."""
        deadline = time.time() + timeout
        with self._idle:
            while self._busy():
                left = deadline - time.time()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.5))
        return True

    # -- reading ---------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """What the tab shows on every refresh: the current (else the last) run, the queued names,
        and whether the queue is paused. Copies one run, not the session's whole history."""
        with self._lock:
            return {"latest": self.latest(), "queue": [s.name for s, _ in self._queue], "paused": self._paused}

    def latest(self) -> Optional[RunStatus]:
        with self._lock:
            return copy.deepcopy(self._current or (self._runs[-1] if self._runs else None))

    def run(self, run_id: str) -> RunStatus:
        with self._lock:
            for r in self._runs:
                if r.id == run_id:
                    return copy.deepcopy(r)
        raise KeyError(run_id)

    # -- worker ----------------------------------------------------------------------------------
    def _new_id(self) -> str:
        return f"run-{next(self._ids)}"

    def _enqueue(self, status: RunStatus, request: RunRequest, start: bool, front: bool = False) -> None:
        self._runs.append(status)
        self._requests[status.id] = request
        self._queue.insert(0 if front else len(self._queue), (status, request))
        if start:
            self._paused = False
        self._ensure_worker()

    def running(self) -> Optional[RunStatus]:
        """The run the worker holds now (preparing, training or finishing), else None."""
        with self._lock:
            return self._current

    def _busy(self) -> bool:
        return self._current is not None or (bool(self._queue) and not self._paused)

    def _ensure_worker(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            if self._queue and not self._paused:
                self._thread = threading.Thread(target=self._work, name="lora-train-runs", daemon=True)
                self._thread.start()

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._queue or self._paused:
                    self._thread = None
                    self._idle.notify_all()
                    return
                status, request = self._queue.pop(0)
                self._current = status
                self._cancel = threading.Event()
            try:
                self._run_one(status, request)
            finally:
                with self._lock:
                    self._trainer = None  # the run's objects go first: then the trim returns what they held
                memory.return_freed_memory()  # to the system, not kept by the host's process (by hand in Forge: 2.9 GB)
                with self._lock:
                    # the status tells the state the run ended in, and when; nothing of the running one
                    status.stopping, status.eta_seconds = False, None
                    if status.ended_at is None:  # a phase that is not an end one (an exception before it was set)
                        status.ended_at = time.time()
                    self._current = None
                    self._idle.notify_all()

    def _run_one(self, status: RunStatus, request: RunRequest) -> None:
        from lora_train.app import job

        config = request.config
        status.phase = "preparing"
        refusals = self.host.preflight(config)
        if refusals:
            status.phase = "refused"
            status.error = "\n".join(refusals)
            return
        publisher = _Publisher(self, status, request)
        trainer = None
        try:
            with self.host.session(config, status.id) as adapter:
                # the run's TOML names the model it trained on, so the CLI can train it again
                config.model.pretrained_model_name_or_path = adapter.info.path or self.host.model_spec()
                folder = Path(config.saving.output_dir)
                folder.mkdir(parents=True, exist_ok=True)
                sample_fn = self._sample_fn(config, adapter, request, folder)
                # a cached estimate shows for free; max_train_minutes calibrates and fits the epochs
                estimated, _, lines = job.prepare_estimate(config, adapter, self.host.work_dir(), calibrate=False, sample_fn=sample_fn)
                status.messages += lines
                trainer = job.build_trainer(config, adapter, warn=status.messages.append, sample_fn=sample_fn)
                publisher.card.sd_version = SD_VERSION.get(adapter.info.family, "SD1")
                plan = trainer.plan
                status.messages += [msg("skipped {problem}", problem=p) for p in plan.scan.problems + plan.problems]
                status.messages += list(plan.warnings)
                config.save_toml(folder / f"{status.name}.toml")
                with self._lock:
                    self._trainer = trainer
                    if self._cancel.is_set():  # Stop pressed while preparing
                        status.phase = "cancelled"
                        return
                status.phase = "training"
                from lora_train.train.observers import LossCsv
                from lora_train.train.trackers import build_trackers

                from lora_train.train.estimate import RunTimer, after_run_lines

                csv = LossCsv(folder / f"{status.name}-loss.csv")
                timer = RunTimer(adapter.device)
                listeners = [lambda e: self._observe(status, e), csv, self.host.on_event, publisher, timer]
                listeners += build_trackers(config.logging, trainer.notes)  # log_with from a loaded config
                trainer.run(lambda e: [listen(e) for listen in listeners], self._cancel)
                if estimated is not None:
                    status.messages += after_run_lines(config, estimated, trainer.plan, timer)
        except UserError as e:
            status.phase = "failed"
            status.error = str(e)
        except BaseException as e:  # keep the tab alive; the trainer already saved what it had
            status.phase = "failed"
            status.error = f"{type(e).__name__}: {e}"
            status.messages.append(traceback.format_exc(limit=8))
        finally:
            if status.phase == "finished":
                self._drop_interrupted(status)
                if request.after is not None:
                    self._after(status, request.after)
            if trainer is not None and trainer.last_save is not None and status.phase in ("failed", "cancelled"):
                publisher.publish(trainer.last_save)
                state = trainer.last_save.with_name(trainer.last_save.stem + "-state")
                if state.is_dir():
                    status.resume_state = str(state)
            if status.phase in ("finished", "cancelled") and status.published:
                publisher.suggest(Path(config.saving.output_dir))

    def _after(self, status: RunStatus, after: Callable[[RunStatus], list[str]]) -> None:
        """The request's follow-up; its failure is one line of the run's messages, and the run stays finished."""
        try:
            lines = list(after(status))
        except UserError as e:
            lines = [str(e)]
        except Exception as e:  # the trained file is saved and published: nothing of it is lost
            lines = [msg("after the run: {error}", error=f"{type(e).__name__}: {e}")]
        with self._lock:
            status.messages += lines

    def _drop_interrupted(self, status: RunStatus) -> None:
        """A run that finished after a Resume: its `-interrupted` saves leave the LoRA folder (the work
        folder keeps them) and the file list; only the finished run's files are offered."""
        stale = [p for p in status.published if re.fullmatch(rf"{re.escape(status.name)}-interrupted(_\d+)?", Path(p).stem)]
        if not stale:
            return
        for path in stale:
            unpublish(Path(path))
        with self._lock:
            status.published = [p for p in status.published if p not in stale]
            for path in stale:
                status.checks.pop(path, None)
        self.host.lora_files_changed()

    def _observe(self, status: RunStatus, e) -> None:
        with self._lock:
            if isinstance(e, ev.Started):
                status.total_steps, status.epochs = e.total_steps, e.epochs
                status.messages += list(e.notes)
                self._t0, self._step0 = time.time(), None
            elif isinstance(e, ev.Step):
                if self._step0 is None:  # time from the first step: preparing and caching are not speed
                    self._t0, self._step0 = time.time(), e.step
                status.step, status.epoch = e.step, e.epoch
                if status.losses and status.losses[-1][0] >= e.step:  # resumed: drop the steps trained again
                    status.losses = [x for x in status.losses if x[0] < e.step]
                status.losses.append((e.step, e.loss))
                if status.validation and status.validation[-1][0] >= e.step:
                    status.validation = [x for x in status.validation if x[0] < e.step]
                done = e.step - self._step0
                elapsed = time.time() - self._t0
                if done > 0 and elapsed > 0:
                    status.steps_per_second = done / elapsed
                    status.eta_seconds = (status.total_steps - e.step) / status.steps_per_second
            elif isinstance(e, ev.Validation):
                if not status.validation or status.validation[-1][0] != e.step:  # a step's and its epoch's pass agree
                    status.validation.append((e.step, e.loss))
                if e.kind == "epoch":
                    status.epoch_validation[e.epoch] = (e.step, e.loss)
            elif isinstance(e, ev.Samples):
                status.previews += e.paths
            elif isinstance(e, ev.Notice):
                status.messages.append(e.text)
            elif isinstance(e, ev.Finished):
                status.phase = "finished"
            elif isinstance(e, ev.Cancelled):
                status.phase = "cancelled"
            elif isinstance(e, ev.Failed):
                status.phase = "failed"


class _Publisher:
    """Copies every save into the host's LoRA folder with its card and, once rendered, its preview."""

    def __init__(self, manager: RunManager, status: RunStatus, request: RunRequest):
        self.manager = manager
        self.status = status
        self.card = Card(activation_text=request.trigger, preferred_weight=request.preferred_weight, notes=request.notes)
        self.done: set[str] = set()  # saved paths already published
        self.copies: dict[str, str] = {}  # saved path -> its published copy (free_stem may have renamed it)
        self.without_preview: list[Path] = []
        self.last_samples: tuple[int, list[str]] | None = None

    def __call__(self, e) -> None:
        if isinstance(e, ev.CheckpointSaved):
            self.publish(Path(e.path), e.step)
        elif isinstance(e, ev.Finished):
            self.publish(Path(e.path), e.steps)
        elif isinstance(e, ev.Cancelled) and e.path:
            self.publish(Path(e.path), e.step)
        elif isinstance(e, ev.Samples) and e.paths:
            self.last_samples = (e.step, e.paths)
            for path in self.without_preview:
                set_preview(path, Path(e.paths[0]))
            self.without_preview = []

    def publish(self, saved: Path, step: Optional[int] = None) -> None:
        if str(saved) in self.done or not saved.is_file():
            return
        folder = self.manager.host.lora_dir()
        stem = free_stem(folder, saved.stem)
        path = publish(saved, folder, stem, self.card)
        self.done.add(str(saved))
        self.copies[str(saved)] = str(path)
        if self.last_samples and (step is None or self.last_samples[0] == step):
            set_preview(path, Path(self.last_samples[1][0]))
        else:
            self.without_preview.append(path)
        messages = self.manager.host.after_publish(path)
        with self.manager._lock:
            self.status.published.append(str(path))
            self.status.checks[str(path)] = "; ".join(messages)
            self.status.messages += [m for m in messages if check_failed(m)]

    def suggest(self, folder: Path) -> None:
        """pick's ranking of the run's saves on the status, and its note on the cards of the suggested
        and the final published file; older notes of the run (a stop before a Resume) go. Only the
        LoRA folder's cards are written, never the run's saves."""
        from lora_train.tools.cards import set_note
        from lora_train.tools.pick import card_note, is_card_note, rank_if_validated

        status = self.status
        try:
            ranking = rank_if_validated(folder, status.name)
        except (UserError, OSError) as e:  # the run itself is fine: say why there is no suggestion
            status.messages.append(str(e))
            return
        if ranking is None:  # no validation_split: nothing to rank
            return
        with self.manager._lock:
            published = list(status.published)
        copies = {Path(p).stem: p for p in published} | {Path(k).stem: v for k, v in self.copies.items()}
        rows = [(copies.get(s.file.stem, str(s.file)), s.epoch, s.loss) for s in ranking.saves]
        best = copies.get(ranking.best.file.stem, "") if ranking.best else ""
        note = card_note(ranking, Path(best).stem) if best else None
        with self.manager._lock:
            status.ranking, status.suggested = rows, best
        for path in published:
            set_note(Path(path), note if path in (best, published[-1]) else None, is_card_note)


def _require_dataset(config: TrainConfig) -> None:
    """A run whose dataset folder or TOML is missing, or whose size or network cannot be read, is
    refused at Start, not queued to fail."""
    from lora_train.dataset.spec import parse_resolution
    from lora_train.network.kind import network_kind

    d = config.dataset
    parse_resolution(d.resolution, 512)  # raises the message the plan shows
    network_kind(config.network)
    for key, path, exists in (("dataset_config", d.dataset_config, Path.is_file), ("train_data_dir", d.train_data_dir, Path.is_dir),
                              ("reg_data_dir", d.reg_data_dir, Path.is_dir)):
        if path and not exists(Path(path)):
            raise UserError(msg("{what} '{path}' does not exist", what=key, path=path))
        if key == "dataset_config" and path:
            return  # a dataset TOML replaces the folders


_process_manager: Optional[RunManager] = None
_process_manager_lock = threading.Lock()


def process_manager(make_host: Callable[[], Host]) -> RunManager:
    """The one RunManager of this process, made with `make_host()` on first use. It outlives the
    WebUI's UI reloads (this module stays in `sys.modules` when the WebUI re-imports the extension's
    script), so a reload never starts a second manager beside a run that is still going."""
    global _process_manager
    with _process_manager_lock:
        if _process_manager is None:
            _process_manager = RunManager(make_host())
        return _process_manager


def existing_process_manager() -> Optional[RunManager]:
    return _process_manager
