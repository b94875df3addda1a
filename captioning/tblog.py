"""TensorBoard event files of a training run, in models_dir/<dataset>/tb/ beside train_log.jsonl.

    make tensorboard        # then open the URL it prints

What is written (rank 0 only; `--tensorboard false` turns it off):
- `train/loss`, `train/perplexity`, `lr/<group>`: every `log_every` steps, where train() reads
  the loss anyway (the .item() that waits for the GPU), so a step pays for no extra sync;
- self-critical training (scst.py): `train/reward`, `train/baseline`, `train/sample_length`,
  `train/finished` instead of the perplexity, and `val/cider`;
- `val/loss`, `val/perplexity` and `samples` (greedy captions of the same few val images,
  beside a reference caption, as a text table) at each epoch end.

The events are appended to the file in the training loop's own thread, in TensorBoard's
record format (its RecordWriter and protos): a record of three scalars is 15 µs of work
alone, 0.13 ms inside a training loop on a busy 2-core CPU. torch's SummaryWriter hands each
event to a background thread instead; there the GIL passing to and from that thread made a
call 2.5 ms and the step after it 13% slower (benchmarks/tensorboard_overhead.py). The file
is flushed every FLUSH_SECONDS and at each epoch end.
A fresh run finds no events: the previous run's tb/ was moved aside with its checkpoints
(rundir.prepare_run_dir); a resumed run hides the events logged after its checkpoint (a purge,
as SummaryWriter's purge_step), as it drops those log rows.
"""
import itertools
import math
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .config import Config
from .inference import caption_images
from .model import CNNModel, LSTMModel
from .vocabulary import Vocab, load_coco

SAMPLE_IMAGES = 4
FLUSH_SECONDS = 10
_file_numbers = itertools.count()           # two files in one second from one process get different names


class EventFile:
    """One TensorBoard event file, written synchronously: no thread, one buffered append per event."""

    def __init__(self, folder: str, purge_step: int | None = None) -> None:
        # lazy, here and below: tensorboard is optional (open_board trains on without it)
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.summary.writer.record_writer import RecordWriter

        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, f"events.out.tfevents.{time.time():010.0f}.{socket.gethostname()}."
                                         f"{os.getpid()}.{next(_file_numbers)}")
        self.file = open(self.path, "ab")
        self.records, self.Event, self.flushed = RecordWriter(self.file), Event, time.monotonic()
        self.add(Event(wall_time=time.time(), step=purge_step or 0, file_version="brain.Event:2"))
        if purge_step:  # TensorBoard hides every earlier event of this run at or after purge_step
            self.add(Event(wall_time=time.time(), step=purge_step, session_log=SessionLog(status=SessionLog.START)))
        self.flush()

    def add(self, event: Any) -> None:
        self.records.write(event.SerializeToString())
        if time.monotonic() - self.flushed > FLUSH_SECONDS:
            self.flush()

    def summary(self, step: int, summary: Any) -> None:
        self.add(self.Event(wall_time=time.time(), step=step, summary=summary))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """{tag: float} as one event."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        self.summary(step, Summary(value=[Summary.Value(tag=t, simple_value=float(v)) for t, v in values.items()]))

    def flush(self) -> None:
        self.file.flush()
        self.flushed = time.monotonic()

    def close(self) -> None:
        self.file.close()


class TrainingBoard:
    def __init__(self, config: Config, vocab: Vocab, device: str | torch.device, resume_step: int = 0,
                 log: Callable[[str], object] = print) -> None:
        self.config, self.vocab, self.device = config, vocab, device
        self.dir = os.path.join(config.models_dir, "tb")
        self.events = EventFile(self.dir, purge_step=resume_step + 1 if resume_step else None)
        self.samples = self._sample_images()
        log(f"TensorBoard events in {self.dir} (make tensorboard)")

    def _sample_images(self) -> list[tuple[str, str]]:
        """(path, a reference caption) of the val images with the smallest ids: the same at every epoch."""
        coco = load_coco(self.config.captions_json("val"))
        folder = self.config.resized_images("val")
        samples: list[tuple[str, str]] = []
        for i in sorted(coco.imgs):
            path = os.path.join(folder, coco.imgs[i]["file_name"])
            if os.path.isfile(path) and coco.imgToAnns.get(i):
                samples.append((path, coco.imgToAnns[i][0]["caption"].strip()))
            if len(samples) == SAMPLE_IMAGES:
                break
        return samples

    def training(self, step: int, loss: float, optimizer: torch.optim.Optimizer,
                 scalars: Mapping[str, float] | None = None) -> None:
        """The training loss (a float already read), its perplexity, and each parameter group's learning rate;
        `scalars`: what the objective says beside its loss (self-critical training: reward, baseline, sample
        length), as train/<name>, instead of a perplexity, which its loss does not have."""
        values = {"train/loss": loss}
        if scalars:
            values.update({f"train/{k}": v for k, v in scalars.items()})
        else:
            values["train/perplexity"] = math.exp(min(loss, 50))
        for name, group in zip(("head", "backbone"), optimizer.param_groups):
            values[f"lr/{name}"] = group["lr"]
        self.events.scalars(step, values)

    def note(self, step: int, tag: str, message: str) -> None:
        """A line of text (e.g. "changed on resume: lr 0.001 -> 0.0005") under `tag`, at `step`."""
        from torch.utils.tensorboard.summary import text

        self.events.summary(step, text(tag, message))
        self.events.flush()

    def validation(self, step: int, val_loss: float, encoder: CNNModel, decoder: LSTMModel,
                   scores: Mapping[str, float] | None = None) -> None:
        """The validation loss (and `scores`, e.g. {"val/cider": ...}), and greedy captions of the sample images
        (the models are left in eval mode)."""
        from torch.utils.tensorboard.summary import text

        self.events.scalars(step, {"val/loss": val_loss, "val/perplexity": math.exp(min(val_loss, 50)),
                                   **(scores or {})})
        if not self.samples:
            self.events.flush()
            return
        results = caption_images([p for p, _ in self.samples], encoder, decoder, self.vocab, self.config,
                                 self.device, beam_size=1, batch_size=len(self.samples))
        rows = [f"| {os.path.basename(path)} | {caption if error is None else 'unreadable: ' + error} | {ref} |"
                for (path, caption, error), (_, ref) in zip(results, self.samples)]
        table = "\n".join(["| image | greedy caption | a reference |", "|---|---|---|", *rows])
        self.events.summary(step, text("samples", table))
        self.events.flush()                  # an epoch's results show now

    def close(self) -> None:
        self.events.close()


def open_board(config: Config, vocab: Vocab, device: str | torch.device, resume_step: int = 0,
               log: Callable[[str], object] = print) -> TrainingBoard | None:
    """A TrainingBoard, or None (with a warning) where the tensorboard package is not installed."""
    try:
        return TrainingBoard(config, vocab, device, resume_step, log)
    except ImportError as e:
        log(f"warning: no TensorBoard events ({e}); pip install -r requirements.txt installs it")
        return None
