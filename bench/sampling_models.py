"""The models bench/sampling.py times: trained demo priors or random ones, the MaskGIT of the
target's size, LANTERN neighbours, and their `transformers` Llama exports with call counters."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import Tensor

from prior import GPT, GPTConfig, MaskGIT, MaskGITConfig, load_prior
from prior.conditioning import Condition
from prior.hf_export import to_llama
from sampling import DistillConfig, Pipeline, RelaxedAcceptance, TreeDraft, distill_tree_draft
from tokenizer import Tokenizer


@dataclass
class Models:
    """Our priors, and the 1D-RoPE GPTs the transformers comparison runs on (exported)."""

    target: GPT
    draft: GPT
    maskgit: MaskGIT
    relaxed: RelaxedAcceptance
    weights: str
    hf_target_src: GPT
    hf_draft_src: GPT
    hf_weights: str
    tree_draft: TreeDraft | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def hf_is_main(self) -> bool:
        return self.hf_target_src is self.target and self.hf_draft_src is self.draft


def resolve(path: str | None) -> Path | None:
    """A saved model folder (config.json inside), or its final/ subfolder; None when absent."""
    if not path:
        return None
    for candidate in (Path(path), Path(path) / "final"):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def random_gpt(like: GPTConfig | None, dim: int, layers: int, heads: int, args) -> GPT:
    """A freshly initialised 1D-RoPE GPT of the given size (vocab/grid/cond from `like`)."""
    if like is not None:
        cfg = dataclasses.replace(like, dim=dim, n_layers=layers, n_heads=heads, rope="1d")
    else:
        cfg = GPTConfig(
            vocab_size=args.vocab, grid=[args.grid, args.grid], cond="class",
            num_classes=args.num_classes, dim=dim, n_layers=layers, n_heads=heads, rope="1d",
        )  # fmt: skip
    torch.manual_seed(args.seed)
    return GPT(cfg).eval()


def load_gpt(path: Path) -> GPT:
    model = load_prior(path)
    if not isinstance(model, GPT):
        raise ValueError(f"{path} holds a {type(model).__name__}; this benchmark needs a GPT prior")
    if model.config.cond == "text":
        raise ValueError(f"{path}: text-conditional priors are not supported (no Llama export)")
    return model.eval()


def build_models(args) -> Models:
    prior_dir = None if args.random else resolve(args.prior)
    notes: list[str] = []
    if prior_dir is None:
        target = random_gpt(None, args.target_dim, args.target_layers, args.target_heads, args)
        draft = random_gpt(None, args.draft_dim, args.draft_layers, args.draft_heads, args)
        weights = "random"
    else:
        target, weights = load_gpt(prior_dir), f"trained ({prior_dir})"
        draft_dir = resolve(args.draft)
        if draft_dir is not None:
            draft = load_gpt(draft_dir)
        else:
            sizes = (args.draft_dim, args.draft_layers, args.draft_heads)
            draft = random_gpt(target.config, *sizes, args)
            notes.append("no trained draft found: the draft is random, acceptance is meaningless")
    if target.config.cond != draft.config.cond:
        raise ValueError(f"draft cond {draft.config.cond!r} != target {target.config.cond!r}")
    tok_dir = None if prior_dir is None else resolve(args.tokenizer)
    if tok_dir is not None:
        pipe = Pipeline(Tokenizer.from_pretrained(tok_dir).eval(), target, draft)
        relaxed = pipe.relaxed_acceptance(args.relaxed_k, args.relaxed_delta)
    else:  # LANTERN neighbours of a random 8-dim codebook
        rng = torch.Generator().manual_seed(args.seed)
        codebook = torch.randn(target.config.vocab_size, 8, generator=rng)
        relaxed = RelaxedAcceptance.from_codebook(codebook, args.relaxed_k, args.relaxed_delta)
        if prior_dir is not None:
            notes.append("no tokenizer found: LANTERN neighbours come from a random codebook")
    mg_fields = {f.name: getattr(target.config, f.name) for f in dataclasses.fields(GPTConfig)}
    mg_fields.pop("model_type")
    torch.manual_seed(args.seed)
    maskgit = MaskGIT(MaskGITConfig(**mg_fields)).eval()
    hf_target, hf_draft, hf_weights = target, draft, weights
    if target.config.rope != "1d" or draft.config.rope != "1d":
        tc, dc = target.config, draft.config
        if tc.rope != "1d":
            hf_target = random_gpt(tc, tc.dim, tc.n_layers, tc.n_heads, args)
        if dc.rope != "1d":
            hf_draft = random_gpt(tc, dc.dim, dc.n_layers, dc.n_heads, args)
        hf_weights = "random (the trained prior/draft uses 2D RoPE, which has no Llama export)"
        notes.append(
            "the transformers comparisons run on freshly initialised 1D-RoPE GPTs of the same "
            "sizes (ours side by side on those same weights)"
        )
    tree_draft = None if args.call_costs_only else load_tree_draft(target, args, notes)
    return Models(target, draft, maskgit, relaxed, weights, hf_target, hf_draft, hf_weights,
                  tree_draft, notes)  # fmt: skip


def load_tree_draft(target: GPT, args, notes: list[str]) -> TreeDraft | None:
    """The demo's distilled tree draft when it fits the target, else one distilled here (a
    minute or two for the trained digits prior; seconds with --quick)."""
    if target.config.cond not in ("class", "none"):
        return None
    folder = Path(args.tree_draft) if args.tree_draft else None
    cfg = target.config
    if folder is not None and (folder / "config.json").is_file():
        draft = TreeDraft.from_pretrained(folder)
        try:
            draft.check_fits(vocab_size=cfg.vocab_size, num_tokens=cfg.seq_len,
                             num_classes=cfg.num_classes)  # fmt: skip
            return draft
        except ValueError as err:
            notes.append(f"{folder} does not fit the target ({err}): tree draft distilled here")
    quick = {"samples": 500, "sample_batch": 250, "steps": 100} if args.quick else {}
    config = DistillConfig(guidance_scale=args.cfg, seed=args.seed, **quick)
    draft, report = distill_tree_draft(target, config, progress=False)
    notes.append(f"tree draft distilled here in {report['seconds']:.0f} s at guidance {args.cfg:g}")
    return draft


def conditions(model: torch.nn.Module, batch: int) -> tuple[Condition, Condition, Tensor | None]:
    """(cond, uncond, class ids or None) for `batch` rows cycling over the classes."""
    device = next(model.parameters()).device
    if model.config.cond == "class":
        ids = torch.arange(batch, device=device) % model.config.num_classes
        return model.condition(class_ids=ids), model.null_condition(batch), ids
    return model.condition(batch_size=batch), model.null_condition(batch), None


class CallCounter:
    """Forwards of a transformers model and the tokens fed to them (for assisted generation)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = self.fed = 0
        module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.calls += 1
        self.fed += 0 if ids is None else int(ids.shape[1])

    def reset(self) -> None:
        self.calls = self.fed = 0


@dataclass
class HF:
    target: Any
    draft: Any
    target_calls: CallCounter
    draft_calls: CallCounter


def export(models: Models, args, device: torch.device) -> HF:
    transformers.logging.set_verbosity_error()
    target = to_llama(models.hf_target_src).to(device)
    draft = to_llama(models.hf_draft_src).to(device)
    gc = draft.generation_config  # the assistant's drafting policy: our fixed draft length
    gc.num_assistant_tokens, gc.num_assistant_tokens_schedule = args.draft_len, "constant"
    gc.assistant_confidence_threshold = 0.0  # off: no early stop of a draft round
    return HF(target, draft, CallCounter(target), CallCounter(draft))
