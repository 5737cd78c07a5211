"""Decoding algorithms over a prior's tokens and the prompt -> image Pipeline built on them."""

from sampling.autoregressive import generate_ar, generate_rq
from sampling.engine import DecodeEngine, EngineBatch
from sampling.guidance import GuidanceSchedule, guide, guide_batch
from sampling.jacobi import generate_jacobi
from sampling.logits import SamplingConfig, probabilities, process_logits, sample
from sampling.maskgit import generate_maskgit, reveal_schedule
from sampling.noise import RowNoise
from sampling.pipeline import Pipeline, PipelineOutput
from sampling.relaxed import RelaxedAcceptance, neighbours
from sampling.row_settings import RowSettings
from sampling.speculative import generate_speculative, verify
from sampling.stats import SpeculativeStats
from sampling.tree import TreeShape, generate_tree
from sampling.tree_draft import DistillConfig, TreeDraft, distill_tree_draft

__all__ = [
    "Pipeline",
    "PipelineOutput",
    "GuidanceSchedule",
    "DecodeEngine",
    "EngineBatch",
    "RelaxedAcceptance",
    "RowNoise",
    "RowSettings",
    "SamplingConfig",
    "SpeculativeStats",
    "DistillConfig",
    "TreeDraft",
    "TreeShape",
    "distill_tree_draft",
    "generate_tree",
    "generate_ar",
    "generate_jacobi",
    "generate_maskgit",
    "generate_rq",
    "generate_speculative",
    "guide",
    "guide_batch",
    "neighbours",
    "probabilities",
    "process_logits",
    "reveal_schedule",
    "sample",
    "verify",
]
