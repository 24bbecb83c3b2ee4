"""Typed, validated configuration of a distillation loss (the `loss:` block of a run config)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rlkd.objectives.registry import get_objective


class RankingConfig(BaseModel):
    """The RLKD ranking term and how it is combined with the base objective.

    mode: ``fixed``     w_rank * L_rank + w_base * L_base (paper: 2 : 1)
          ``dynamic``   w_rank * L_rank + w_base * (|topk_T ∩ topk_S| / k) * L_base (App. D, Eq. 2)
          ``rank_only`` w_rank * L_rank, no base objective ("Rank-k")
    fidelity: ``paper`` exact per-token union and NaN-safe correlation; ``official`` reproduces
          the released code: batch-level torch.unique union, rank + base/2 weighting (the weights
          below are ignored), and on a NaN ranking loss the whole micro-batch falls back to the
          base loss alone, undivided.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    k: int = Field(5, ge=1, description="top-k of teacher and of student whose union is ranked")
    rank_weight: float = Field(2.0, ge=0.0)
    base_weight: float = Field(1.0, ge=0.0)
    mode: Literal["fixed", "dynamic", "rank_only"] = "fixed"
    correlation: Literal["spearman", "pearson"] = "spearman"
    scores: Literal["logits", "probs"] = "logits"
    regularization_strength: float = Field(1.0, gt=0.0, description="l2 soft-rank strength (torchsort default 1.0)")
    backend: Literal["auto", "torch", "torchsort"] = "auto"
    fidelity: Literal["paper", "official"] = "paper"

    @model_validator(mode="after")
    def _official_is_fixed(self) -> "RankingConfig":
        if self.fidelity == "official" and self.mode != "fixed":
            raise ValueError("ranking.fidelity='official' reproduces the released code, which only has mode='fixed'")
        return self


class LossConfig(BaseModel):
    """Base objective (by registry name) plus the optional ranking term."""

    model_config = ConfigDict(extra="forbid")

    objective: str | None = "kl"
    params: dict[str, float] = Field(default_factory=dict)
    temperature: float = Field(1.0, gt=0.0)
    chunk_size: int | None = Field(None, ge=1, description="positions per chunk; None = as many as fit 2^22 logits (16 MiB in fp32)")
    ranking: RankingConfig = Field(default_factory=lambda: RankingConfig(enabled=False))
    fused_lm_head: bool = Field(False, description="compute logits from final hidden states chunk by chunk "
                                "(rlkd.objectives.fused): no N x V tensor for either model")

    @model_validator(mode="after")
    def _check(self) -> "LossConfig":
        rank_only = self.ranking.enabled and self.ranking.mode == "rank_only"
        if self.objective is None and not rank_only:
            raise ValueError("loss.objective is required unless ranking.mode='rank_only'")
        if self.objective is not None:
            try:
                spec = get_objective(self.objective)
            except KeyError as err:
                raise ValueError(str(err.args[0])) from None
            self.params = spec.resolve_params(self.params)
        return self

    @property
    def uses_base(self) -> bool:
        return self.objective is not None and not (self.ranking.enabled and self.ranking.mode == "rank_only")

    def label(self) -> str:
        """Short name used in tables: 'KL', 'KL+R', 'KL+R(dyn)', 'Rank-15', 'KL+R(pearson)'."""
        base = (self.objective or "").upper()
        r = self.ranking
        if not r.enabled:
            return base
        if r.mode == "rank_only":
            name = f"Rank-{r.k}"
        else:
            name = f"{base}+R" + ("(dyn)" if r.mode == "dynamic" else "")
        if r.correlation == "pearson":
            name += "(pearson)"
        if r.fidelity == "official":
            name += "(official)"
        return name
