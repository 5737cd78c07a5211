"""The stage-1 / stage-2 contract, in one place.

A token export is a `datasets` folder plus `manifest.json`; a prior records the identity of the
tokenizer it was trained on. Both speak `TokenizerIdentity`: the tokenizer's hash, codebook
size, code grid, depth and the class names of the data. This module owns that dataclass, the
manifest's reading and writing, the compatibility check and its messages, the code shape
([h, w] or [h, w, D] for depth > 1) and the raster-order flattening of codes that priors use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from einops import rearrange

MANIFEST = "manifest.json"
CODEBOOK = "codebook.safetensors"
FORMAT = "tessera-tokens"
FORMAT_VERSION = 1
IDENTITY_FIELDS = ("hash", "codebook_size", "grid", "depth")
MAX_CODES = 1 << 16  # codes are stored as uint16: codebooks and prior vocabularies stay below


@dataclass
class TokenizerIdentity:
    """Who made the codes. `codebook_size == 0` means "not recorded" (a prior built by hand)."""

    hash: str = ""
    codebook_size: int = 0
    grid: list[int] = field(default_factory=list)
    depth: int = 1
    class_names: list[str] = field(default_factory=list)

    @property
    def recorded(self) -> bool:
        return self.codebook_size > 0

    @property
    def code_shape(self) -> list[int]:
        """Shape of one image's codes: [h, w], or [h, w, D] when there are D > 1 depths."""
        return list(self.grid) + ([self.depth] if self.depth > 1 else [])

    def tokenizer_fields(self) -> dict[str, Any]:
        """The manifest's "tokenizer" block (class names live beside it)."""
        return {"hash": self.hash, "codebook_size": self.codebook_size,
                "grid": list(self.grid), "depth": self.depth}  # fmt: skip

    def with_classes(self, class_names: list[str]) -> TokenizerIdentity:
        return TokenizerIdentity(self.hash, self.codebook_size, list(self.grid), self.depth,
                                 list(class_names))  # fmt: skip

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> TokenizerIdentity:
        tok = manifest["tokenizer"]
        return cls(
            hash=str(tok.get("hash", "")),
            codebook_size=int(tok["codebook_size"]),
            grid=[int(x) for x in tok["grid"]],
            depth=int(tok.get("depth", 1)),
            class_names=list(manifest.get("class_names", [])),
        )

    def differences(self, other: TokenizerIdentity) -> list[str]:
        """'field: ours vs theirs' for every field that differs. The hash counts only when both
        recorded one, the class names only when both have some."""
        diffs = []
        for name in (*IDENTITY_FIELDS, "class_names"):
            ours, theirs = getattr(self, name), getattr(other, name)
            if name == "hash" and (not ours or not theirs):
                continue
            if name == "class_names" and (not ours or not theirs):
                continue
            if name in ("grid", "class_names"):
                ours, theirs = list(ours), list(theirs)
            if ours != theirs:
                diffs.append(f"{name}: prior has {ours!r}, tokens/tokenizer have {theirs!r}")
        return diffs

    def check_matches(self, other: TokenizerIdentity, where: str = "") -> None:
        """ValueError naming every differing field (nothing to check when we recorded nothing)."""
        if not self.recorded:
            return
        diffs = self.differences(other)
        if diffs:
            prefix = f"{where}: " if where else ""
            raise ValueError(prefix + "tokenizer mismatch: " + "; ".join(diffs))


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of an export directory (ValueError when it is not one)."""
    path = Path(path)
    file = path / MANIFEST
    if not path.is_dir():
        raise FileNotFoundError(f"token export {path} not found")
    if not file.is_file():
        raise ValueError(f"{path} is not a token export: no {MANIFEST} in it")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ValueError(f"{file}: format {found!r} is not {FORMAT!r}")
    if not isinstance(manifest.get("tokenizer"), dict):
        raise ValueError(f"{file}: no 'tokenizer' block")
    return manifest


def build_manifest(identity: TokenizerIdentity, **fields: Any) -> dict[str, Any]:
    """A manifest for codes made by `identity` (class names included), plus export `fields`."""
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "tokenizer": identity.tokenizer_fields(),
        "class_names": list(identity.class_names),
        **fields,
        "code_shape": identity.code_shape,
        "code_dtype": "uint16",
    }


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> None:
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=2))


def flatten_codes(codes: torch.Tensor) -> torch.Tensor:
    """Grid codes [B, h, w] -> [B, N], or [B, h, w, D] -> [B, N, D], in raster order."""
    if codes.dim() == 3:
        return rearrange(codes, "b h w -> b (h w)")
    return rearrange(codes, "b h w d -> b (h w) d")


def unflatten_codes(codes: torch.Tensor, grid: list[int] | tuple[int, int]) -> torch.Tensor:
    """Flat prior codes [B, N] -> [B, h, w], or [B, N, D] -> [B, h, w, D] (raster order)."""
    h, w = grid
    if codes.dim() == 2:
        return rearrange(codes, "b (h w) -> b h w", h=h, w=w)
    return rearrange(codes, "b (h w) d -> b h w d", h=h, w=w)
