"""Prompt -> image: `Pipeline.from_pretrained(tokenizer_dir, prior_dir, draft_dir)` then `pipe(prompts)`.

The call shape follows diffusers: prompts in, an output dataclass with images (PIL, numpy or raw
codes) and the decoding statistics out; bad argument combinations raise ValueError up front.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from prior import MaskGIT, check_tokenizer, load_prior
from prior.conditioning import Condition
from sampling.generate import DecodeOptions, check_method, generate_codes
from sampling.guidance import GuidanceSchedule
from sampling.logits import SamplingConfig
from sampling.noise import RowNoise
from sampling.relaxed import RelaxedAcceptance
from sampling.stats import SpeculativeStats
from sampling.tree_draft import TreeDraft
from tokenizer import Tokenizer
from tokenizer.images import to_pil, to_uint8
from tokenizer.manifest import unflatten_codes

OUTPUT_TYPES = ("pil", "np", "codes")
Prompt = str | int


@dataclass
class PipelineOutput:
    """images: list of PIL images, a uint8 array [B, H, W, 3], or codes; codes always kept."""

    images: list[Image.Image] | np.ndarray | Tensor
    codes: Tensor
    prompts: list[Prompt] = field(default_factory=list)
    stats: SpeculativeStats | None = None
    reveal_counts: list[int] | None = None


class Pipeline:
    """A tokenizer, a prior and optionally a draft prior, checked to agree on the codes."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prior: torch.nn.Module,
        draft: torch.nn.Module | None = None,
        tree_draft: TreeDraft | None = None,
    ) -> None:
        identity = tokenizer.identity()
        if tree_draft is not None:
            cfg = prior.config
            tree_draft.check_fits(vocab_size=cfg.vocab_size, num_tokens=cfg.seq_len,
                                  num_classes=cfg.num_classes)  # fmt: skip
        check_tokenizer(prior.config.tokenizer, identity)
        if draft is not None:
            check_tokenizer(draft.config.tokenizer, identity)
            if draft.config.cond != prior.config.cond:
                raise ValueError(
                    f"draft conditioning '{draft.config.cond}' != prior '{prior.config.cond}'"
                )
        self.tokenizer = tokenizer.eval()
        self.prior = prior.eval()
        self.draft = draft.eval() if draft is not None else None
        self.tree_draft = tree_draft.eval() if tree_draft is not None else None
        self._relaxed: dict[tuple[int, float], RelaxedAcceptance] = {}

    @classmethod
    def from_pretrained(
        cls,
        tokenizer_dir: str | Path,
        prior_dir: str | Path,
        draft_dir: str | Path | None = None,
        device: str | torch.device | None = None,
        tree_draft_dir: str | Path | None = None,
    ) -> Pipeline:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        tokenizer = Tokenizer.from_pretrained(tokenizer_dir).to(device)
        prior = load_prior(prior_dir).to(device)
        draft = load_prior(draft_dir).to(device) if draft_dir is not None else None
        tree_draft = None
        if tree_draft_dir is not None:
            tree_draft = TreeDraft.from_pretrained(tree_draft_dir).to(device)
        return cls(tokenizer, prior, draft, tree_draft)

    @property
    def device(self) -> torch.device:
        return next(self.prior.parameters()).device

    @property
    def default_method(self) -> str:
        """The decoding a prior is made for: "maskgit" for MaskGIT, "ar" otherwise."""
        return "maskgit" if isinstance(self.prior, MaskGIT) else "ar"

    @property
    def class_names(self) -> list[str]:
        return list(self.prior.config.tokenizer.class_names)

    def class_id(self, prompt: Prompt) -> int:
        """A class name, an id or an id as text -> id; else a ValueError listing the known classes."""
        num_classes = self.prior.config.num_classes
        if isinstance(prompt, int) and not isinstance(prompt, bool):
            if not 0 <= prompt < num_classes:
                raise ValueError(f"class id {prompt} is outside 0..{num_classes - 1}")
            return prompt
        names = self.class_names
        if prompt in names:
            return names.index(prompt)
        if str(prompt).isdigit():  # an id given as text, e.g. from the command line
            return self.class_id(int(prompt))
        known = ", ".join(names) if names else f"ids 0..{num_classes - 1}"
        raise ValueError(
            f"unknown class '{prompt}' for this class-conditional prior (known: {known})"
        )

    def conditions(
        self, model: torch.nn.Module, prompts: list[Prompt], negative: list[str] | None
    ) -> tuple[Condition, Condition]:
        """(cond, uncond) for `model`; uncond is the null condition or the negative prompts."""
        kind = model.config.cond
        if kind == "class":
            ids = torch.tensor([self.class_id(p) for p in prompts], device=self.device)
            cond = model.condition(class_ids=ids)
        elif kind == "text":
            if not all(isinstance(p, str) for p in prompts):
                raise ValueError("a text-conditioned prior needs text prompts (str)")
            cond = model.condition(texts=[str(p) for p in prompts])
        else:
            cond = model.condition(batch_size=len(prompts))
        if negative is not None:
            if kind != "text":
                raise ValueError("negative prompts need a text-conditioned prior")
            if len(negative) != len(prompts):
                raise ValueError(f"{len(negative)} negative prompts for {len(prompts)} prompts")
            return cond, model.condition(texts=list(negative))
        return cond, model.null_condition(len(prompts))

    def relaxed_acceptance(self, k: int, delta: float) -> RelaxedAcceptance:
        """LANTERN neighbours of each code in the tokenizer's latent space (cached per k, delta)."""
        if (k, delta) not in self._relaxed:
            metric = "cosine" if self.tokenizer.config.quantizer.l2_normalize else "l2"
            codebook = self.tokenizer.codebook().detach().to(self.device)
            self._relaxed[(k, delta)] = RelaxedAcceptance.from_codebook(codebook, k, delta, metric)
        return self._relaxed[(k, delta)]

    @torch.no_grad()
    def __call__(
        self,
        prompts: Sequence[Prompt] | Prompt,
        *,
        guidance_scale: float = 1.0,
        guidance_schedule: str = "constant",
        guidance_stop: float | None = None,
        guidance_plausibility: float = 0.0,
        negative_prompts: Sequence[str] | None = None,
        method: str = "ar",
        num_images_per_prompt: int = 1,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        num_steps: int | None = None,
        draft_len: int | None = None,
        adaptive_draft: bool | str | None = None,
        relaxed_k: int | None = None,
        relaxed_delta: float | None = None,
        jacobi_window: int | None = None,
        jacobi_coupling: str | None = None,
        tree_size: int | None = None,
        seed: int | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        compile: bool | str = False,
        output_type: str = "pil",
    ) -> PipelineOutput:
        """Generate `num_images_per_prompt` images per prompt (class name/id or text).

        Method options (num_steps: maskgit; draft_len, adaptive_draft: speculative / relaxed;
        relaxed_k, relaxed_delta: relaxed; jacobi_window, jacobi_coupling: jacobi; tree_size:
        tree, which needs the pipeline's tree_draft and gives AR's images) default to
        None = the method's default; setting one for another method is a ValueError.

        seed: an int s makes image i of this call sample (s, i); a list gives each image its
        own seed (sample (seeds[i], 0)). An image depends only on its prompt, settings and
        (seed, index), never on the other images of the call. generator: per-image seeds are
        drawn from it instead. compile: compile the decode engine ("auto": on CUDA)."""
        decode = DecodeOptions(method, num_steps, draft_len, adaptive_draft, relaxed_k,
                               relaxed_delta, jacobi_window, jacobi_coupling,
                               tree_size)  # fmt: skip
        check_method(self.prior, method, self.draft, self.tree_draft)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got '{output_type}'")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        prompts = [prompts] if isinstance(prompts, str | int) else list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negative = None
        if negative_prompts is not None:
            negative = [n for n in negative_prompts for _ in range(num_images_per_prompt)]
        noise = self.noise(len(prompts), seed, generator)
        sampling = SamplingConfig(temperature, top_k, top_p)
        guidance = GuidanceSchedule(
            guidance_scale, guidance_schedule, guidance_stop, guidance_plausibility
        )
        cond, uncond = self.conditions(self.prior, prompts, negative)
        class_ids = None
        if method == "tree" and self.prior.config.cond == "class":
            class_ids = torch.tensor([self.class_id(p) for p in prompts], device=self.device)
        draft_conds, relaxed = None, None
        if method in ("speculative", "relaxed"):
            draft_conds = self.conditions(self.draft, prompts, negative)
        if method == "relaxed":
            relaxed = self.relaxed_acceptance(decode.get("relaxed_k"), decode.get("relaxed_delta"))
        out = generate_codes(
            self.prior, cond, uncond, decode=decode, sampling=sampling, guidance=guidance,
            draft=self.draft, draft_conds=draft_conds, relaxed=relaxed, noise=noise,
            compile=compile, tree_draft=self.tree_draft, class_ids=class_ids,
        )  # fmt: skip
        return self.output_for(out.codes, prompts, output_type, out.stats, out.reveal_counts)

    def noise(
        self, images: int, seed: int | Sequence[int] | None, generator: torch.Generator | None
    ) -> RowNoise:
        """The images' seeds: (seed, 0..images-1), one seed each, or drawn from `generator`."""
        if seed is not None and generator is not None:
            raise ValueError("give seed or generator, not both")
        if seed is None:
            return RowNoise.from_generator(images, generator, self.device)
        if isinstance(seed, int) and not isinstance(seed, bool):
            return RowNoise.from_seeds([seed] * images, list(range(images)), self.device)
        seeds = list(seed)
        if len(seeds) != images or not all(isinstance(s, int) for s in seeds):
            raise ValueError(f"seed: give one int or {images} ints (one per image), got {seed!r}")
        return RowNoise.from_seeds(seeds, device=self.device)

    def decode(self, codes: Tensor) -> Tensor:
        """Flat prior codes [B, N] or [B, N, D] -> images [B, 3, H, W] in [-1, 1]."""
        return self.tokenizer.decode(unflatten_codes(codes, self.tokenizer.grid)).clamp(-1, 1)

    def output_for(
        self,
        codes: Tensor,
        prompts: list[Prompt],
        output_type: str = "pil",
        stats: SpeculativeStats | None = None,
        counts: list[int] | None = None,
    ) -> PipelineOutput:
        """Codes [B, N] (or [B, N, D]) decoded into what a call with `output_type` returns; the
        server uses it to decode a finished row on its own."""
        if output_type == "codes":
            return PipelineOutput(codes, codes, prompts, stats, counts)
        images = self.decode(codes)
        out = to_pil(images) if output_type == "pil" else to_uint8(images)
        return PipelineOutput(out, codes, prompts, stats, counts)
