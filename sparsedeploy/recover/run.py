"""`sparsedeploy recover`: a short distillation from the dense teacher that wins back
the quality one-shot pruning lost, with every pruned weight held at exactly zero.

Training is transformers' `Trainer` (so optimizers, schedules, mixed precision on a GPU,
checkpoints and resume, and accelerate's multi-GPU launchers come from the ecosystem);
what is ours is the loss (KL to the teacher's next-token distribution, computed on the
fly), the masks, the data split and the record. The trainer's state lives in a hidden
directory beside the output, so an interrupted run resumes where its last save was; the
output itself appears only when recovery finished and the pattern was verified.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sparsedeploy import __version__
from sparsedeploy.atomic import staged_directory
from sparsedeploy.data.sources import check_disjoint, load_text
from sparsedeploy.data.windows import tokenize
from sparsedeploy.errors import EXIT_GATE_FAILED, BadInput, Interrupted, SparsedeployError
from sparsedeploy.models.adapters import adapter_for
from sparsedeploy.models.checkpoint import (
    Checkpoint,
    checkpoint_sha256,
    load_model,
    load_tokenizer,
    recorded_source,
)
from sparsedeploy.models.inspection import (
    SPARSITY_FILE,
    inferred_pattern,
    measure_linear_sublayers,
    recorded_sparsity,
    worst_nm_compliance,
)
from sparsedeploy.recover.distill import (
    distillation_kl,
    hold_pruned_weights,
    next_token_loss,
    pruned_positions,
    reapply_masks,
    revived_weights,
)
from sparsedeploy.ui import info

EVALUATION_SOURCE = "wikitext2"
LOSS_PLOT = "recovery_loss.png"
STATE_FORMAT = 1  # bump when what the state directory holds changes


class TrainingDiverged(SparsedeployError):
    """The loss became NaN or infinite (exit 1): the last good state is kept."""

    exit_code = EXIT_GATE_FAILED


@dataclass(frozen=True)
class RecoverSettings:
    steps: int = 120
    seqlen: int = 256
    batch: int = 4
    lr: float = 2e-4
    warmup_steps: int = 10
    temperature: float = 1.0
    lm_weight: float = 0.0  # share of the plain next-token loss mixed into the KL
    data: str = "canterbury-books"
    heldout_windows: int = 16  # from the end of the training text, for early stopping
    eval_every: int = 25
    patience: int = 4  # evaluations without a better held-out loss before stopping
    seed: int = 0
    device: str = "cpu"

    def validate(self) -> None:
        if self.steps < 1:
            raise BadInput(f"--steps {self.steps} must be at least 1")
        if self.seqlen < 8:
            raise BadInput(f"--seqlen {self.seqlen} is too short to learn from; use 128 or more")
        if self.batch < 1:
            raise BadInput(f"--batch {self.batch} must be at least 1")
        if not (0 < self.lr < 1) or not math.isfinite(self.lr):
            raise BadInput(f"--lr {self.lr} is not a usable learning rate; try 1e-4")
        if self.temperature <= 0:
            raise BadInput(f"--temperature {self.temperature} must be positive; 1.0 is plain distillation")
        if not 0 <= self.lm_weight <= 1:
            raise BadInput(f"--lm-weight {self.lm_weight} must be between 0 (KL only) and 1 (next-token loss only)")
        if self.eval_every < 1 or self.heldout_windows < 1:
            raise BadInput("--eval-every and --heldout-windows must be at least 1")
        if self.device not in ("cpu", "cuda"):
            raise BadInput(f"--device {self.device} is unknown; use cpu or cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise BadInput("--device cuda, but torch sees no CUDA GPU here; use --device cpu")


@dataclass(frozen=True)
class RecoverRequest:
    checkpoint: Checkpoint
    output: Path
    teacher: str | None = None  # None: the source recorded in the checkpoint's sparsity.json
    settings: RecoverSettings = RecoverSettings()


def state_directory(output: Path) -> Path:
    return output.parent / f".{output.name}.recover-state"


def check_same_vocabulary(student_tokenizer, teacher_tokenizer, student, teacher) -> None:
    """Distillation compares distributions token id by token id: the two models must
    share the tokenizer and the output vocabulary."""
    student_vocab = student.get_output_embeddings().weight.shape[0]
    teacher_vocab = teacher.get_output_embeddings().weight.shape[0]
    if student_vocab != teacher_vocab:
        raise BadInput(f"the teacher's vocabulary has {teacher_vocab} entries and the student's {student_vocab}; "
                       "pass --teacher the dense model this checkpoint was pruned from")
    if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise BadInput("the teacher's tokenizer differs from the student's; "
                       "pass --teacher the dense model this checkpoint was pruned from")


def training_windows(tokenizer, settings: RecoverSettings) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Non-overlapping windows of the training text: the held-out ones from its end (for
    early stopping; never the evaluation text), the training ones from the rest."""
    source = load_text(settings.data)
    check_disjoint(source, load_text(EVALUATION_SOURCE), role="training")
    ids = tokenize(tokenizer, source)
    windows = ids.numel() // settings.seqlen
    if windows < settings.heldout_windows + settings.batch:
        raise BadInput(f"'{source.name}' has {ids.numel()} tokens, {windows} windows of {settings.seqlen}; "
                       f"recovery needs at least {settings.heldout_windows + settings.batch} "
                       "(held-out + one batch): use a longer --data source or a shorter --seqlen")
    all_windows = ids[: windows * settings.seqlen].reshape(windows, settings.seqlen)
    train, heldout = all_windows[: -settings.heldout_windows], all_windows[-settings.heldout_windows:]
    record = {**source.describe(), "seqlen": settings.seqlen, "train_windows": int(train.shape[0]),
              "train_tokens": int(train.numel()), "heldout_windows": int(heldout.shape[0]),
              "heldout_tokens": int(heldout.numel())}
    return train, heldout, record


class TokenWindows(torch.utils.data.Dataset):
    def __init__(self, windows: torch.Tensor):
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, index: int) -> dict:
        # "labels" only tells the Trainer this batch has a loss to evaluate; the loss
        # itself is the distillation loss below.
        return {"input_ids": self.windows[index], "labels": self.windows[index]}


def _fingerprint(student_sha: str, teacher_sha: str, data_record: dict, settings: RecoverSettings) -> str:
    document = {"format": STATE_FORMAT, "student": student_sha, "teacher": teacher_sha, "data": data_record["sha256"],
                "settings": asdict(settings), "tool": __version__}
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def _prepare_state(state: Path, fingerprint: str) -> str | None:
    """The checkpoint to resume from, if the state directory holds one of this very run."""
    from transformers.trainer_utils import get_last_checkpoint

    marker = state / "request.sha256"
    if state.is_dir():
        if marker.is_file() and marker.read_text().strip() == fingerprint:
            last = get_last_checkpoint(str(state))
            if last:
                return last
        else:
            info(f"discarding '{state}': it holds an interrupted recovery with other inputs or settings")
        shutil.rmtree(state)
    state.mkdir(parents=True)
    marker.write_text(fingerprint + "\n")
    return None


def _trainer(student, teacher, train, heldout, settings: RecoverSettings, state: Path, masks, named, started_step):
    from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    class DistillationTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids = inputs["input_ids"]
            with torch.no_grad():
                teacher_logits = teacher(input_ids=ids, use_cache=False).logits
            outputs = model(input_ids=ids, use_cache=False)
            loss = distillation_kl(outputs.logits, teacher_logits, settings.temperature)
            if settings.lm_weight:
                loss = (1 - settings.lm_weight) * loss + settings.lm_weight * next_token_loss(outputs.logits, ids)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"the loss became {loss.item()} at step {self.state.global_step + 1}")
            return (loss, outputs) if return_outputs else loss

    class HoldMasks(TrainerCallback):
        def on_optimizer_step(self, args, state, control, **kwargs):
            reapply_masks(named, masks)

    class Progress(TrainerCallback):
        def __init__(self):
            self.clock = time.perf_counter()
            self.step = started_step

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" in logs:
                now = time.perf_counter()
                rate = (state.global_step - self.step) * settings.batch * settings.seqlen / max(now - self.clock, 1e-9)
                self.clock, self.step = now, state.global_step
                info(f"recover step {state.global_step}/{state.max_steps}: loss {logs['loss']:.4f}, "
                     f"lr {logs.get('learning_rate', 0):.2e}, {rate:.0f} tokens/s")
            if "eval_loss" in logs and state.max_steps:  # (the one-shot evaluation says its own line)
                info(f"recover step {state.global_step}/{state.max_steps}: held-out loss {logs['eval_loss']:.4f}")

    cuda = settings.device == "cuda"
    arguments = TrainingArguments(
        output_dir=str(state),
        max_steps=settings.steps,
        per_device_train_batch_size=settings.batch,
        per_device_eval_batch_size=settings.batch,
        learning_rate=settings.lr,
        lr_scheduler_type="cosine",
        warmup_steps=min(settings.warmup_steps, settings.steps // 2),
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=max(1, min(5, settings.eval_every)),
        eval_strategy="steps",
        eval_steps=settings.eval_every,
        save_strategy="steps",
        save_steps=settings.eval_every,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        prediction_loss_only=True,
        report_to="none",
        use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        # Recomputing activations saves GPU memory; on a CPU, memory is not the limit.
        activation_checkpointing=cuda,
        activation_checkpointing_kwargs={"use_reentrant": False} if cuda else None,
        seed=settings.seed,
        data_seed=settings.seed,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    trainer = DistillationTrainer(
        model=student,
        args=arguments,
        train_dataset=TokenWindows(train),
        eval_dataset=TokenWindows(heldout),
        callbacks=[HoldMasks(), Progress(), EarlyStoppingCallback(early_stopping_patience=settings.patience)],
    )
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts on stdout; Progress says it on stderr
    return trainer


def recover_checkpoint(request: RecoverRequest) -> dict:
    """The whole `recover` command: returns the sparsity.json document it wrote."""
    settings = request.settings
    settings.validate()
    started = time.perf_counter()
    recorded = recorded_sparsity(request.checkpoint)
    if recorded is None and request.teacher is None:
        raise BadInput(f"'{request.checkpoint.path}' has no {SPARSITY_FILE} naming its dense source; "
                       "pass --teacher MODEL (the dense model it was pruned from)")
    teacher_checkpoint = recorded_source(request.checkpoint, recorded, request.teacher, flag="--teacher")
    tokenizer = load_tokenizer(request.checkpoint)
    student = load_model(request.checkpoint)
    teacher = load_model(teacher_checkpoint, device=settings.device)
    teacher.requires_grad_(False)
    check_same_vocabulary(tokenizer, load_tokenizer(teacher_checkpoint), student, teacher)
    train, heldout, data_record = training_windows(tokenizer, settings)

    # Only the decoder layers learn: embeddings (and a head tied to them) were not pruned,
    # and their gradients are a large share of a CPU step.
    student.requires_grad_(True)
    student.get_input_embeddings().requires_grad_(False)
    student.get_output_embeddings().requires_grad_(False)
    adapter = adapter_for(student)
    named = {linear.name: linear.module.weight for linear in adapter.linear_sublayers()}
    masks = pruned_positions(named.items())
    hold_pruned_weights(named, masks)
    layers_before, sparsity_before = measure_linear_sublayers(student)

    student_sha = checkpoint_sha256(request.checkpoint.path)
    teacher_sha = checkpoint_sha256(teacher_checkpoint.path)
    state = state_directory(request.output)
    resume_from = _prepare_state(state, _fingerprint(student_sha, teacher_sha, data_record, settings))
    started_step = int(resume_from.rsplit("-", 1)[-1]) if resume_from else 0
    info(f"Recovering {request.checkpoint.spec}: distillation from {teacher_checkpoint.spec}, "
         f"{settings.steps} steps x {settings.batch} x {settings.seqlen} tokens of {data_record['name']} "
         f"({data_record['train_tokens']:,} training tokens, {data_record['heldout_tokens']:,} held out), "
         f"{sum(int(m.sum()) for m in masks.values()):,} pruned weights held at zero"
         + (f"; resuming from step {started_step}" if resume_from else ""))

    trainer = _trainer(student, teacher, train, heldout, settings, state, masks, named, started_step)
    try:
        heldout_before = _heldout_before(trainer, state, resume_from)
        trainer.train(resume_from_checkpoint=resume_from)
    except Interrupted:
        saved = _last_saved_step(state)
        raise Interrupted("interrupted; no output was written. "
                          + (f"Rerun the same command to resume from step {saved}" if saved
                             else "Nothing was saved yet: a rerun starts over")) from None
    except TrainingDiverged as error:
        saved = _last_saved_step(state)
        raise TrainingDiverged(f"{error}; no output was written"
                               + (f"; the last good state (step {saved}) is kept in '{state}'" if saved else "")
                               + "; rerun with a lower --lr") from None

    reapply_masks(named, masks)  # the best checkpoint was loaded back: hold the masks once more
    revived = revived_weights(named, masks)
    if revived:
        name, count = next(iter(revived.items()))
        raise SparsedeployError(f"internal error: {count} pruned weights of {name} became non-zero during recovery; report this")
    heldout_after = trainer.evaluate()["eval_loss"]
    layers_after, sparsity_after = measure_linear_sublayers(student)
    _check_pattern_kept(layers_before, layers_after)

    history = trainer.state.log_history
    recovery = {
        "teacher": {"path": teacher_checkpoint.spec if teacher_checkpoint.spec == "default" else str(teacher_checkpoint.path),
                    "sha256": teacher_sha},
        "student_sha256": student_sha,
        "data": data_record,
        "loss": "kl" if not settings.lm_weight else f"kl + {settings.lm_weight} x next-token",
        "settings": asdict(settings),
        "steps": trainer.state.global_step,
        "best_step": _best_step(trainer),
        "tokens_seen": trainer.state.global_step * settings.batch * settings.seqlen,
        "heldout_loss_before": heldout_before,
        "heldout_loss_after": heldout_after,
        "train_loss_first": next((h["loss"] for h in history if "loss" in h), None),
        "train_loss_last": next((h["loss"] for h in reversed(history) if "loss" in h), None),
        "early_stopped": trainer.state.global_step < settings.steps,
        "pruned_weights_held": sum(int(m.sum()) for m in masks.values()),
        "pattern_verified": True,
        "trainer": "transformers.Trainer",
        "device": settings.device,
        "seconds": round(time.perf_counter() - started, 1),
        "loss_plot": LOSS_PLOT,
    }
    document = dict(recorded) if recorded else {
        "schema": "sparsedeploy.sparsity/1", "method": None, "pattern": inferred_pattern(layers_after, sparsity_after),
        "source": recovery["teacher"],
    }
    document["tool_version"] = __version__
    document["layers"] = layers_after
    document.setdefault("measured", {})["total_sparsity"] = sparsity_after
    document["measured"]["nm_compliance"] = worst_nm_compliance(layers_after)
    document["recovery"] = recovery

    student.eval()
    with staged_directory(request.output) as staging:
        student.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        plot_losses(history, heldout_before, staging / LOSS_PLOT)
        (staging / SPARSITY_FILE).write_text(json.dumps(document, indent=2) + "\n")
    shutil.rmtree(state, ignore_errors=True)
    return document


def _heldout_before(trainer, state: Path, resume_from: str | None) -> float:
    """Held-out loss of the one-shot model, measured once (kept across a resume)."""
    saved = state / "heldout_before.json"
    if resume_from and saved.is_file():
        return json.loads(saved.read_text())["eval_loss"]
    loss = trainer.evaluate()["eval_loss"]
    info(f"recover step 0: held-out loss {loss:.4f} (one-shot)")
    saved.write_text(json.dumps({"eval_loss": loss}) + "\n")
    return loss


def _last_saved_step(state: Path) -> int | None:
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(state)) if state.is_dir() else None
    return int(last.rsplit("-", 1)[-1]) if last else None


def _best_step(trainer) -> int | None:
    best = trainer.state.best_model_checkpoint
    return int(best.rsplit("-", 1)[-1]) if best else None


def _check_pattern_kept(before: list[dict], after: list[dict]) -> None:
    for old, new in zip(before, after, strict=True):
        if new["sparsity"] < old["sparsity"]:
            raise SparsedeployError(f"internal error: {new['name']} lost sparsity in recovery; report this")
        for pattern, compliance in old["nm_compliance"].items():
            if compliance == 1.0 and new["nm_compliance"][pattern] != 1.0:
                raise SparsedeployError(f"internal error: {new['name']} lost {pattern} compliance in recovery; report this")


def plot_losses(history: list[dict], heldout_before: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    heldout = [(0, heldout_before)] + [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    if train:
        axis.plot(*zip(*train), label="training (KL to teacher)")
    axis.plot(*zip(*heldout), marker="o", label="held-out")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title("Recovery by distillation")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
