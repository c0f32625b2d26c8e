"""Knowledge distillation: a smaller student learns from any variant's soft outputs, without labels.

The teacher is the StepData's teacher variant (torch or ONNX, run as it is deployed) or the
model being compressed. The student is the same architecture narrower (``width``), a card
architecture of its own, or any MONAI network the card format names. It learns from the
teacher's softened probabilities on the user's unlabelled scans (KL at temperature T × T² plus
soft Dice to the teacher's mask); the train cases that have labels add the labels' loss too, so
a few labelled scans and many unlabelled ones train one student together.

Defaults suit a student trained from scratch on small lesions: temperature 1 (a binary
segmentation teacher is often unsure at lesion borders; softening further washed lesions out of
tiny students here) and lesion pixels weighted ×10.
"""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from app.core.model_card import Architecture, ModelCard
from app.core.progress import Progress, scaled

from compression.data import split_by_labels
from compression.pipeline import StepData, WorkingModel
from compression.training import TrainConfig, make_distillation_loss, make_labels_loss, train_loop

WIDTH_ARGS = ("channels", "features", "init_features")  # MONAI argument names that set a network's width


def student_architecture(teacher: Architecture | None, width: float, student: dict | None) -> Architecture:
    """The student's architecture: given explicitly, or the teacher's with every width × ``width``."""
    if student is not None:
        return Architecture(student["name"], dict(student.get("args", {})))
    if teacher is None:
        raise ValueError("the teacher has no architecture in its card; name the student explicitly "
                         "(student={'name': 'UNet', 'args': {...}})")
    args = dict(teacher.args)
    for key in WIDTH_ARGS:
        if key in args:
            value = args[key]
            args[key] = ([max(2, int(round(c * width))) for c in value] if isinstance(value, (list, tuple))
                         else max(2, int(round(value * width))))
    return Architecture(teacher.name, args)


def distill(model: WorkingModel, data: StepData, *, width: float = 0.5, student: dict | None = None,
            steps: int = 300, lr: float = 3e-3, batch_size: int = 8, crop: int | None = None,
            temperature: float = 1.0, label_weight: float = 0.5, use: str = "auto", amp: str = "auto",
            max_slices: int | None = None, foreground_weight: float = 10.0, seed: int | None = None,
            init: str = "auto", focus: float = 0.0, focus_every: int = 2000, weight_bits: int | None = None,
            qat_share: float = 0.25, slice_context: int = 0, guided: bool = True, hint_weight: float = 0.0,
            time_limit_s: float | None = None):
    """Train a fresh student; it replaces the model (the teacher stays the reference).

    ``use``: "teacher" (label-free), "both" (teacher everywhere + labels where a case has them,
    weight ``label_weight``), "labels" (labelled cases only, no teacher: the baseline a
    distillation must beat), "auto" (both when any train case has labels).
    ``init``: "scratch", "teacher" (the teacher's channels pruned by magnitude down to the student's
    widths, when the student is the teacher's architecture narrower: it starts where the teacher's
    strongest channels are, and converges in far fewer steps), "auto" (teacher unless ``use`` is
    "labels", which must not see the teacher at all).
    ``focus``: the share of each batch drawn from the train slices where the student misses most
    of the teacher's lesion pixels, re-scored every ``focus_every`` steps (hard-example mining,
    :class:`~compression.training.DisagreementSampler`; 0 = uniform).
    ``max_slices``: at most that many slices from the labelled train scans, half of them with a
    lesion, and as many again from the unlabelled ones; None takes every slice. With ``guided``
    the unlabelled scans' half is drawn from the slices where the teacher sees lesion: it runs
    over every slice of those scans first (on a scan it never saw, where it raises its alarms is
    what the student must learn to copy, and a random sample holds few of those slices); without,
    they are a random sample. On the demo UNet (bench/README.md, 30 Nov) the teacher saw lesion on
    36 % of the slices of 120 new scans: the guide raised the share of lesion slices, but its
    one-slice false alarms stay a handful among them. A 512 × 512 slice takes 1 MB in memory, and
    while the two samples are joined both are held twice: 3000 of each peaked at 16 GB, and
    6000 of each ran out of the project machine's 23 GB.
    ``weight_bits`` (e.g. 4; None or 0: float): quantization-aware distillation. For the last
    ``qat_share`` of the steps every convolution sees its weights rounded per output channel to
    that many bits (straight-through gradients), and the student ends on that grid:
    ``quantize_int8_ort(mode="weights", bits=4)`` afterwards stores exactly these weights, at half
    the bytes of int8.
    ``slice_context`` (2D segmenters): the student reads that many neighbouring axial slices on
    each side as extra input channels (2.5-D; the card's ``input.slice_context``), while the
    teacher reads the centre slice as it always has. A one-slice network cannot tell a blob on a
    single slice from a nodule that goes on through the next ones; the neighbours show it. Its
    train slices are held as float16 (three channels of 6000 whole slices: 9 GB). Starting from
    the teacher, the student's first layers read the centre slice with the teacher's weights and
    the neighbours with zeros: it begins as the pruned one-slice teacher and learns to use them.
    On the demo UNet (bench/README.md, 30 Nov) `smallest`'s recipe with ``slice_context=1`` beat
    the original's Dice against the labels (0.870 against 0.854), but lost as many of its
    lesions: with labels it learnt that a one-slice blob is no nodule, and dropped the
    original's one-slice false alarms more surely.
    ``hint_weight`` (> 0; the model being compressed, in torch, teaches a student whose blocks
    are named as its own, e.g. its architecture narrower): feature distillation
    (FitNets' hints). The teacher runs beside the student on every batch, and a 1 × 1 convolution
    per block maps the student's features onto the teacher's at the same place
    (:class:`_Hints`): the student learns how the teacher sees the whole slice, not only where
    it ends up calling lesion. Each step then costs a teacher pass too. On the demo UNet
    (bench/README.md, 30 Nov) `smallest`'s recipe with weight 0.5 trained 1.55× as long and lost
    more of the original's lesions (8 against 6, 3 of them nodules): at 0.35 of the width the
    hints compete with the output for the student's few channels.
    ``time_limit_s``: the whole step ends within about this many seconds. Reading the slices and
    the teacher's outputs come first; training then takes as many of ``steps`` as fit in what is
    left, at the pace it measures as it trains (``TrainConfig.time_limit_s``), with the learning
    rate's schedule and the quantization-aware share fitted to that count (the search gives its
    student a share of its time limit this way). It fails when nothing is left to train in.
    """
    from app.core.models import build_network

    from compression.training import DisagreementSampler, scratch_array, seed_all

    began = time.perf_counter()
    if weight_bits and not (2 <= weight_bits <= 8 and 0 < qat_share <= 1):  # None or 0: float
        raise ValueError(f"weight_bits must be 2…8 and qat_share in (0, 1]; not {weight_bits} and {qat_share}")
    if hint_weight > 0 and (model.module is None or data.teacher is not None):
        raise ValueError("hint_weight needs the model being compressed as the teacher, in torch: its features "
                         "are what the student learns")
    arch = student_architecture(model.card.architecture, width, student)
    card = _student_card(model.card, arch, slice_context)
    arch = card.architecture
    labelled = bool(len(split_by_labels(data.train)[0]))
    use = ("both" if labelled else "teacher") if use == "auto" else use
    if use in ("labels", "both") and not labelled:
        raise ValueError(f"distillation with {use!r} needs labels on at least one train case")
    teacher = _Teacher(model, data)
    guide = _TeacherGuide(teacher) if guided else None
    arrays = yield from scaled(_training_arrays(card, data, use, max_slices, guide), 0.0, 0.02,
                               "reading train slices: ")
    guided_note = guide.note() if guide is not None else None
    if guided_note:
        model.notes.append(guided_note)
    if use != "labels":
        yield Progress(0.02, "teacher outputs on the train slices")
        # every train slice: memory-mapped, so it takes page cache, not memory (4.3 GB for 4,277 slices)
        arrays["teacher"] = teacher.targets(arrays["x"], allocate=scratch_array(model.scratch("teacher_logits.npy")))
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=data.seed if seed is None else seed,
                         device=data.device, amp=amp, crop=crop, threads=data.threads,
                         time_limit_s=_time_left(time_limit_s, began))
    seed_all(config.seed, data.threads)
    net = build_network(arch, "distillation student")
    if init == "teacher" or (init == "auto" and use != "labels"):
        _start_from_teacher(model, net)
    loss = (make_labels_loss(foreground_weight) if use == "labels" else
            make_distillation_loss(temperature, label_weight if use == "both" else 0.0, foreground_weight))
    sampler = (DisagreementSampler(arrays["x"], arrays["teacher"], focus, focus_every, data.device)
               if focus > 0 and "teacher" in arrays else None)
    quantized = (_QuantizeFrom(net, weight_bits, steps - int(round(qat_share * steps)), qat_share)
                 if weight_bits else None)
    hints = _Hints(model, net, card.input.channels, hint_weight, data.device) if hint_weight > 0 else None
    try:
        groups = [{"params": list(net.parameters()) + hints.parameters()}] if hints else None
        on_cut = quantized.retarget if quantized is not None else None
        stats = yield from scaled(train_loop(net, arrays, hints.loss(loss) if hints else loss, config,
                                             param_groups=groups, sampler=sampler, after_step=quantized,
                                             label="distillation", on_cut=on_cut), 0.05, 1.0)
    finally:
        if quantized is not None:
            quantized.bake()
        if hints is not None:
            hints.close()
    if hints is not None:
        stats["hints"] = hints.summary()
        model.notes.append(f"Feature distillation: the student's {len(hints.layers)} blocks learnt the teacher's "
                           f"features there too (weight {hint_weight}; normalised error "
                           f"{stats['hints']['first']:.3f} at the start, {stats['hints']['last']:.3f} at the end).")
    if quantized is not None:
        stats["weight_bits"] = {"bits": weight_bits, "from_step": quantized.start, "layers": len(quantized.layers)}
        model.notes.append(f"Quantization-aware: from step {quantized.start} of {stats['steps']} the student's "
                           f"{len(quantized.layers)} convolutions trained on {weight_bits}-bit weights (per output "
                           f"channel); its weights end on that grid.")
    if sampler is not None:
        stats["focus"] = {"share": focus, "every": focus_every, "lesion_slices": int(len(sampler.lesion_slices)),
                          "rescored": sampler.history}
        if sampler.history:
            first, last = sampler.history[0], sampler.history[-1]
            model.notes.append(
                f"Hard-example mining: {focus:.0%} of each batch from the {len(sampler.lesion_slices)} slices where "
                f"the teacher sees lesion, weighted by the share of its lesion pixels the student missed "
                f"(mean {first['missed_mean']:.3f} at step {first['step']}, {last['missed_mean']:.3f} at step "
                f"{last['step']}).")
    if "steps_planned" in stats:
        model.notes.append(f"The time limit ({time_limit_s:.0f} s for the whole step) cut training to "
                           f"{stats['steps']} of the {steps} steps planned; a longer limit trains further.")
    _adopt_student(model, net.to("cpu").eval(), card, use, stats, temperature)
    return model


def _time_left(time_limit_s: float | None, began: float) -> float | None:
    """Seconds left to train in, of a whole step's limit; fails when none are."""
    if time_limit_s is None:
        return None
    left = time_limit_s - (time.perf_counter() - began)
    if left <= 0:
        raise ValueError(f"the time limit ({time_limit_s:.0f} s) ran out before the student could train: reading "
                         f"the train slices and the teacher's outputs took {time.perf_counter() - began:.0f} s")
    return left


def _student_card(teacher: ModelCard, arch: Architecture, slice_context: int) -> ModelCard:
    """The teacher's card with the student's architecture, reading ``slice_context`` neighbours."""
    if not slice_context:
        return replace(teacher, architecture=arch)
    if teacher.task != "segmentation" or teacher.input.dims != 2:
        raise ValueError(f"slice_context is for 2D segmenters; {teacher.name} is a "
                         f"{teacher.input.dims}D {teacher.task} model")
    if not 0 < slice_context <= 3:
        raise ValueError(f"slice_context must be 1, 2 or 3 neighbours on each side, not {slice_context}")
    if "in_channels" not in arch.args:
        raise ValueError(f"the student {arch.name} names no in_channels: cannot give it neighbouring slices")
    channels = 2 * slice_context + 1
    arch = Architecture(arch.name, {**arch.args, "in_channels": channels})
    return replace(teacher, architecture=arch,
                   input=replace(teacher.input, channels=channels, slice_context=slice_context))


class _QuantizeFrom:
    """``after_step`` hook: from step ``start`` on, the weights are fake-quantized to ``bits``."""

    def __init__(self, net, bits: int, start: int, share: float):
        self.net, self.bits, self.start, self.share, self.step, self.layers = net, bits, max(0, start), share, 0, []
        self.begun = False
        if self.start == 0:
            self._begin()

    def _begin(self) -> None:
        from compression.steps.qat import fake_quantize_weights

        self.begun = True
        self.layers = fake_quantize_weights(_convs(self.net), self.bits)

    def __call__(self, _module, _lr) -> None:
        self.step += 1
        if self.step >= self.start and not self.begun:
            self._begin()

    def retarget(self, steps: int) -> None:
        """Training now runs ``steps``: the quantized share is its last ``share`` of those. Once begun it
        stays begun, so a cut after that leaves it a smaller share; the weights end on the grid all the same."""
        if self.begun:
            return
        self.start = max(self.step, steps - int(round(self.share * steps)))
        if self.step >= self.start:
            self._begin()

    def bake(self) -> None:
        from compression.steps.qat import bake_weights

        bake_weights(self.layers)


def _training_arrays(card: ModelCard, data: StepData, use: str, max_slices: int | None, guide=None):
    """x for every train case, as the student ``card`` reads them; y with the labels where a
    case has them and IGNORE elsewhere. ``guide`` picks an unlabelled case's lesion slices."""
    from compression.data import cut_slices
    from compression.training import IGNORE

    dtype = np.float16 if card.input.slice_context else np.float32
    with_labels, without = split_by_labels(data.train)
    if use == "teacher":
        x, _ = yield from cut_slices(data.train, card, with_labels=False, max_slices=max_slices, seed=data.seed,
                                     dtype=dtype, guide=guide)
        return {"x": x}
    share = len(with_labels) / max(1, len(data.train)) if use == "both" else 1.0
    x, y = yield from scaled(cut_slices(with_labels, card, with_labels=True, max_slices=max_slices, seed=data.seed,
                                        dtype=dtype), 0.0, share)
    if use == "labels" or not len(without):
        return {"x": x, "y": y}  # uint8; batches turn it into int64
    xu, _ = yield from scaled(cut_slices(without, card, with_labels=False, max_slices=max_slices, seed=data.seed,
                                         dtype=dtype, guide=guide), share, 1.0)
    if xu.shape[1:] != x.shape[1:]:
        raise ValueError(f"labelled slices are {x.shape[2:]}, unlabelled {xu.shape[2:]}: they cannot share batches")
    return {"x": np.concatenate([x, xu]),
            "y": np.concatenate([y, np.full((len(xu),) + y.shape[1:], IGNORE, y.dtype)])}


def _start_from_teacher(model: WorkingModel, net) -> None:
    """Load the teacher, channel-pruned by magnitude to the student's widths, into the student."""
    import copy

    import torch
    import torch_pruning as tp

    from compression.steps.prune_channels import _output_layers, _sync_norm_sizes

    if model.module is None or model.card.architecture is None:
        model.notes.append("The student starts from scratch: no torch teacher of a known architecture to start from.")
        return
    teacher = copy.deepcopy(model.module).eval()
    example = torch.zeros(model.example_shape)
    ratio = 1 - _channel_fraction(teacher, net)
    try:
        outputs = _output_layers(teacher, example)
        tp.pruner.MetaPruner(teacher, example, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
                             pruning_ratio_dict=_exact_ratios(teacher, net, outputs),
                             ignored_layers=outputs).step()
        _sync_norm_sizes(teacher)
        net.load_state_dict(_widen_inputs(teacher.state_dict(), net.state_dict()), strict=True)
        model.notes.append(f"The student started from the teacher's strongest channels ({ratio:.0%} pruned by magnitude).")
    except Exception as exc:  # a student of another shape: from scratch, and say so
        model.notes.append(f"The student starts from scratch: the pruned teacher does not fit it ({type(exc).__name__}).")


def _widen_inputs(teacher: dict, student: dict) -> dict:
    """The teacher's state dict for a student that reads more input channels (2.5-D): where a
    weight reads the input (the teacher's has 1 input channel where the student's has 2k + 1),
    the teacher's weights go to the centre channel and the neighbours start at zero, so the
    student computes exactly what the teacher does until it learns to use them."""
    out = dict(teacher)
    for name, weight in teacher.items():
        wanted = student.get(name)
        if (wanted is None or wanted.shape == weight.shape or weight.dim() < 3 or weight.shape[1] != 1
                or wanted.shape[:1] + wanted.shape[2:] != weight.shape[:1] + weight.shape[2:]):
            continue
        widened = weight.new_zeros(wanted.shape)
        widened[:, wanted.shape[1] // 2] = weight[:, 0]
        out[name] = widened
    return out


def _exact_ratios(teacher, student, ignored) -> dict:
    """Per conv layer, the ratio that leaves exactly the student's width at the same place.

    One global ratio left the pruner's own rounding (16 channels × 0.35 → 5, the student has
    round(5.6) = 6), the pruned teacher did not fit, and the student started from scratch.
    Torch-Pruning keeps int(c × (1 − ratio)) channels: asking for half a channel more than the
    target makes float error unable to round it down.
    """
    teacher_convs, student_convs = _convs(teacher), _convs(student)
    if len(teacher_convs) != len(student_convs):
        return {}
    return {t: 1 - (s.out_channels + 0.5) / t.out_channels for t, s in zip(teacher_convs, student_convs)
            if t not in ignored and s.out_channels < t.out_channels}


def _channel_fraction(teacher, student) -> float:
    def channels(m):
        return sum(layer.out_channels for layer in _convs(m))

    return channels(student) / max(1, channels(teacher))


def _convs(module) -> list:
    """The module's convolutions (transposed ones included), in module order."""
    import torch

    return [layer for layer in module.modules() if isinstance(layer, torch.nn.modules.conv._ConvNd)]


class _Teacher:
    """The teacher's logits (float16) on slices as the student reads them, for one ``distill``.

    Called, it runs a torch teacher on the CPU as its ONNX export, made once and checked against
    torch: the guide reads every slice of the unlabelled scans with it. ONNX Runtime ran the demo
    UNet 2.3–2.5× as fast as eager torch (``bench/bench_teacher_pass.py``). ``targets`` runs the
    teacher as it always has (eager torch for a torch teacher), for the student's targets. The
    export gives the same float16 targets but for rounding (99.97 % of the logits equal, no mask
    pixel changed, on 96 demo slices), and it saved 3.5 of `smallest`'s 50 minutes. But that
    rounding alone turned the seeded rebuild of `smallest` from 6 lost lesions into 9 (30 Nov,
    bench/README.md), and the recipe's published figures are that seed's: a saving that
    changes what a seeded recipe rebuilds is not worth 7 %."""

    def __init__(self, model: WorkingModel, data: StepData):
        self.model, self.data, self.path = model, data, None

    def __call__(self, x: np.ndarray, allocate=None) -> np.ndarray:
        """The guide's pass: a torch teacher on the CPU as its ONNX export; else as ``targets``."""
        from compression.data import reference_input
        from compression.training import onnx_logits

        model, data = self.model, self.data
        if data.teacher is not None or model.module is None or data.device != "cpu":
            return self.targets(x, allocate)
        if self.path is None:
            from compression.export import export_onnx

            self.path = model.scratch("teacher.onnx")
            export_onnx(model.module, self.path, model.example_shape)
        x = reference_input(x, model.card.input.channels)
        return onnx_logits(self.path, x, threads=data.threads, dtype=np.float16, allocate=allocate)

    def targets(self, x: np.ndarray, allocate=None) -> np.ndarray:
        """The student's targets: a given teacher variant as it is deployed, a torch teacher in
        torch (on the CPU too), else the model's ONNX file."""
        from compression.data import reference_input
        from compression.steps._common import teacher_logits
        from compression.training import onnx_logits, predict_logits

        model, data = self.model, self.data
        if data.teacher is not None:
            return teacher_logits(model, data, x, dtype=np.float16, allocate=allocate)
        x = reference_input(x, model.card.input.channels)  # a 2.5-D student's slices: the teacher reads the centre
        if model.module is not None:
            return predict_logits(model.module, x, device=data.device, dtype=np.float16, allocate=allocate)
        return onnx_logits(model.onnx_path, x, threads=data.threads, dtype=np.float16, allocate=allocate)


class _Hints:
    """FitNets' hints for ``distill``: a 1 × 1 convolution per block (an adapter) maps the
    student's features onto the teacher's, and ``loss`` adds their error to the task's.

    The blocks are the modules both networks name alike, of one class (MONAI's ResidualUnit, else
    its Convolution), not inside another such block, and not the last (its output is the logits,
    which the distillation loss already compares). Forward hooks keep each block's output; at each
    step ``loss`` runs the frozen teacher on the batch (the centre slice of a 2.5-D input) and adds
    ``weight`` × the mean over blocks of the adapter's squared error against the teacher's features
    over their variance, so each block counts alike whatever its scale. The adapters train with
    the student (``parameters``) and are dropped with the hooks at ``close``."""

    BLOCKS = ("ResidualUnit", "Convolution")

    def __init__(self, model: WorkingModel, net, channels: int, weight: float, device: str):
        """``channels``: those the student reads (its card's; more than the teacher's when 2.5-D)."""
        import torch

        from compression.data import reference_input

        self.weight, self.history = float(weight), []
        self.teacher = model.module.to(device).eval()
        teacher_blocks, student_blocks = self._blocks(self.teacher), self._blocks(net)
        self.layers = [name for name in teacher_blocks if name in student_blocks][:-1]
        if not self.layers:
            raise ValueError(f"hint_weight: the student {type(net).__name__} names no block as the teacher does")
        self.features: dict[str, dict] = {"teacher": {}, "student": {}}
        self.hooks = [blocks[name].register_forward_hook(self._keep(side, name))
                      for side, blocks in (("teacher", teacher_blocks), ("student", student_blocks))
                      for name in self.layers]
        self.teacher_channels = model.card.input.channels
        example = torch.zeros((1, channels) + tuple(model.example_shape[2:]), device=device)
        with torch.no_grad():
            net.to(device).eval()(example)
            self.teacher(reference_input(example, self.teacher_channels))
        conv = torch.nn.Conv2d if example.dim() == 4 else torch.nn.Conv3d
        self.adapters = torch.nn.ModuleList(
            conv(self.features["student"][n].shape[1], self.features["teacher"][n].shape[1], 1)
            for n in self.layers).to(device)

    @classmethod
    def _blocks(cls, module) -> dict:
        modules = dict(module.named_modules())
        for kind in cls.BLOCKS:
            found = [n for n, m in modules.items() if type(m).__name__ == kind]
            outer = [n for n in found if not any(n.startswith(o + ".") for o in found if o != n)]
            if outer:
                return {n: modules[n] for n in outer}
        return {}

    def _keep(self, side: str, name: str):
        def hook(_module, _inputs, output):
            self.features[side][name] = output
        return hook

    def parameters(self) -> list:
        return list(self.adapters.parameters())

    def loss(self, task_loss):
        import torch

        from compression.data import reference_input

        def loss(logits, batch):
            with torch.no_grad():
                self.teacher(reference_input(batch["x"], self.teacher_channels))
            errors = []
            for name, adapter in zip(self.layers, self.adapters):
                t = self.features["teacher"][name].float()
                s = adapter(self.features["student"][name]).float()
                errors.append(((s - t) ** 2).mean() / (t.var() + 1e-6))
            hint = torch.stack(errors).mean()
            self.history.append(float(hint.detach()))
            return task_loss(logits, batch) + self.weight * hint
        return loss

    def summary(self) -> dict:
        tail = max(1, len(self.history) // 10)
        return {"weight": self.weight, "layers": self.layers,
                "first": float(np.mean(self.history[:tail])) if self.history else float("nan"),
                "last": float(np.mean(self.history[-tail:])) if self.history else float("nan")}

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.features = {"teacher": {}, "student": {}}
        self.teacher.to("cpu")


class _TeacherGuide:
    """Per slice of an unlabelled scan: does the teacher see lesion there (``cut_slices``'s guide)."""

    def __init__(self, teacher: _Teacher):
        self.teacher = teacher
        self.scans = self.slices = self.seen = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        from compression.training import lesion_on_slice

        seen = lesion_on_slice(self.teacher(x))
        self.scans, self.slices, self.seen = self.scans + 1, self.slices + len(x), self.seen + int(seen.sum())
        return seen

    def note(self) -> str | None:
        if not self.scans:
            return None
        return (f"The unlabelled scans' share of the train slices was drawn where the teacher sees lesion: "
                f"it did on {self.seen} of the {self.slices} slices of {self.scans} unlabelled scans.")


def _adopt_student(model: WorkingModel, net, card: ModelCard, use: str, stats: dict, temperature: float) -> None:
    teacher_params = sum(p.numel() for p in model.module.parameters()) if model.module is not None else None
    student_params = sum(p.numel() for p in net.parameters())
    arch = card.architecture
    model.module, model.onnx_path, model.storage = net, None, "dense"
    model.card = card
    model.metrics["distillation"] = {"student": {"name": arch.name, "args": arch.args}, "learnt_from": use,
                                     "temperature": temperature, "teacher_params": teacher_params,
                                     "student_params": student_params, **stats}
    model.notes.append(f"Distilled into a {arch.name} student of {student_params} parameters"
                       + (f" (teacher {teacher_params})" if teacher_params else "")
                       + f", learning from {use}, {stats['steps']} steps ({stats['amp']}).")
