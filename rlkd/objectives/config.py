"""Typed, validated configuration of a distillation loss (the `loss:` block of a run config)."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator,
                      model_validator)

from rlkd.objectives.registry import check_objective, get_objective, is_builtin


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

    enabled: bool = Field(True, description="Add the ranking term. A run config's loss.ranking is off unless "
                          "set (the loss builds it with enabled=false).")
    k: int = Field(5, ge=1, description="Top-k of the teacher and of the student whose union is ranked per "
                   "position (the paper: 5 downstream, 15 in pre-training); must not exceed the vocabulary.")
    rank_weight: float = Field(2.0, ge=0.0, description="Weight of L_rank (the paper: 2).")
    base_weight: float = Field(1.0, ge=0.0, description="Weight of the base objective(s) (the paper: 1).")
    mode: Literal["fixed", "dynamic", "rank_only"] = Field(
        "fixed", description="fixed: rank_weight x L_rank + base_weight x L_base; dynamic: the base term scaled "
        "by the top-k overlap |topk_T ∩ topk_S|/k (App. D); rank_only: L_rank alone ('Rank-k').")
    correlation: Literal["spearman", "pearson"] = Field(
        "spearman", description="spearman: correlation of soft ranks (the paper); pearson: of the scores "
        "themselves (Table 8).")
    scores: Literal["logits", "probs"] = Field(
        "logits", description="What is ranked: logits (what the released code ranks) or probabilities (what "
        "the paper writes).")
    regularization_strength: float = Field(1.0, gt=0.0, description="Strength of Blondel et al.'s l2 soft "
                                           "ranks (torchsort's default 1.0); smaller is closer to hard ranks, "
                                           "with sparser gradients.")
    backend: Literal["auto", "torch", "torchsort"] = Field(
        "auto", description="Soft-rank implementation: torchsort when installed (auto) or the pure-PyTorch "
        "one; they agree to 1e-5.")
    fidelity: Literal["paper", "official"] = Field(
        "paper", description="paper: Eq. 1 (exact per-token union, NaN-safe); official: reproduces the "
        "released code (batch-level union, rank + base/2 weighting, NaN fallback), to measure the "
        "difference; needs mode fixed.")

    @model_validator(mode="after")
    def _official_is_fixed(self) -> "RankingConfig":
        if self.fidelity == "official" and self.mode != "fixed":
            raise ValueError("ranking.fidelity='official' reproduces the released code, which only has mode='fixed'")
        return self


class ObjectiveTerm(BaseModel):
    """One weighted objective of a composed loss: ``weight * objective(**params)``."""

    model_config = ConfigDict(extra="forbid")

    objective: str = Field(description="A registered objective's name (`rlkd objectives` lists them).")
    params: dict[str, float] = Field(default_factory=dict, description="The objective's hyperparameters "
                                     "(e.g. beta of jsd); left-out ones take its declared defaults, and its "
                                     "bounds are checked.")
    weight: float = Field(1.0, ge=0.0, description="This term's weight in the sum of objective terms.")

    @model_validator(mode="after")
    def _resolve(self) -> "ObjectiveTerm":
        self.params = _resolved_params(self.objective, self.params)
        return self


def _resolved_params(objective: str, params: dict[str, float]) -> dict[str, float]:
    """The objective's declared defaults overlaid with ``params``, checked against its bounds."""
    try:
        spec = get_objective(objective)
    except KeyError as err:
        raise ValueError(str(err.args[0])) from None
    resolved = spec.resolve_params(params)
    if params and not is_builtin(spec):  # the defaults were checked at registration; these may not be
        check_objective(spec, resolved)
    return resolved


class RankingTerm(BaseModel):
    """The ranking term written as an item of ``terms``: ``{ranking: {k: 5, ...}, weight: 2}``."""

    model_config = ConfigDict(extra="forbid")

    ranking: dict = Field(default_factory=dict, description="Settings of the ranking term, as in loss.ranking "
                          "(k, mode, correlation, ...).")
    weight: float = Field(2.0, ge=0.0, description="The ranking term's weight (becomes loss.ranking.rank_weight).")


def _term_kind(item) -> str | None:
    """Which kind of term an item of ``loss.terms`` is, so that a bad item is reported against that
    kind alone (not against every member of the union)."""
    keys = set(item) if isinstance(item, dict) else {name for name in ("objective", "ranking") if hasattr(item, name)}
    if "ranking" in keys and "objective" not in keys:
        return "ranking term"
    return "objective term"


class LossConfig(BaseModel):
    """A weighted sum of registered objectives plus the optional ranking term.

    Two spellings of the same thing:
      shorthand   ``objective: kl`` (+ ``params``) and ``ranking: {enabled: true, k: 5}``
                  = rank_weight * L_rank + base_weight * L_kl
      terms       ``terms: [{objective: kl}, {objective: ce, weight: 0.5}, {ranking: {k: 5}, weight: 2}]``
                  = 2 * L_rank + base_weight * (L_kl + 0.5 * L_ce)
    A ranking item of ``terms`` becomes the ``ranking`` block (its weight is ``rank_weight``).
    """

    model_config = ConfigDict(extra="forbid")

    objective: str | None = Field("kl", description="The base objective in the shorthand form (`rlkd "
                                  "objectives` lists them); give terms instead to compose several.")
    params: dict[str, float] = Field(default_factory=dict, description="Hyperparameters of the shorthand "
                                     "objective; left-out ones take its declared defaults.")
    terms: list[Annotated[Union[Annotated[ObjectiveTerm, Tag("objective term")], Annotated[RankingTerm, Tag("ranking term")]],
                          Discriminator(_term_kind)]] | None = Field(
        None, description="A composed loss: weighted objective terms and at most one ranking term, instead of "
        "objective/params.")
    temperature: float = Field(1.0, gt=0.0, description="Both models' logits are divided by it before every "
                               "objective (1: the paper's).")
    chunk_size: int | None = Field(None, ge=1, description="Positions per chunk of the loss; None: as many as fit "
                                   "2^22 logits (16 MiB in fp32). Smaller saves memory at some speed.")
    ranking: RankingConfig = Field(default_factory=lambda: RankingConfig(enabled=False),
                                   description="The RLKD ranking term; off unless enabled.")
    fused_lm_head: bool = Field(False, description="Compute the logits from both models' final hidden states "
                                "and head weights one block at a time (rlkd.objectives.fused): no tokens x V "
                                "tensor for either model. Pays at large vocabularies; needs logits = hidden @ "
                                "W.T.")
    fused_block_mib: float | None = Field(None, gt=0, description="Memory for one block of logits on the fused "
                                          "path, in MiB (sets the block's rows): larger is faster and uses more "
                                          "memory. None: the device's default (CPU 2^24 logits; GPU 1/256 of its "
                                          "memory, at most 1 GiB, at least 1024 rows).")
    compile: Literal["auto", "true", "false"] = Field(
        "auto", description="Run the per-chunk element-wise maths of the built-in objectives and the ranking "
        "term through torch.compile (rlkd.objectives.compiled): fewer passes over each chunk, values equal to "
        "eager to fp32 rounding. auto: compile on CUDA, eager on the CPU (there a compile costs tens of "
        "seconds per shape on a few cores, more than short CPU runs gain, and eager keeps CPU results "
        "bit-identical to the committed tables). A failed compile (no compiler, unsupported operation) "
        "falls back to eager with one printed line.")

    @model_validator(mode="after")
    def _check(self) -> "LossConfig":
        if self.terms is not None:
            if self.objective is not None and "objective" in self.model_fields_set:
                raise ValueError("give either loss.objective (shorthand) or loss.terms, not both")
            if self.params and "params" in self.model_fields_set:
                raise ValueError("loss.params belongs to the shorthand form; put params in each of loss.terms")
            self.objective = None
            ranking_items = [t for t in self.terms if isinstance(t, RankingTerm)]
            if len(ranking_items) > 1:
                raise ValueError("loss.terms: at most one ranking term")
            if ranking_items:
                item = ranking_items[0]
                try:
                    self.ranking = RankingConfig(**{**item.ranking, "enabled": True, "rank_weight": item.weight})
                except ValidationError as exc:  # said against the term, not as pydantic's nested report
                    raise ValueError("ranking term: " + "; ".join(
                        f"ranking.{'.'.join(map(str, e['loc']))}: "
                        + ("unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, "))
                        for e in exc.errors())) from None
            self.terms = [t for t in self.terms if isinstance(t, ObjectiveTerm)]
        rank_only = self.ranking.enabled and self.ranking.mode == "rank_only"
        if not self.objective_terms() and not rank_only:
            raise ValueError("loss needs an objective (loss.objective or loss.terms) unless ranking.mode='rank_only'")
        if self.objective is not None:
            self.params = _resolved_params(self.objective, self.params)
        # Weights are >= 0 each; all of them 0 trains nothing and exports the untouched student.
        ranking = self.ranking.rank_weight if self.ranking.enabled else 0.0
        base = self.ranking.base_weight * sum(t.weight for t in self.objective_terms()) if self.uses_base else 0.0
        if ranking <= 0 and base <= 0:
            weights = [f"{t.objective}: {t.weight:g}" for t in self.objective_terms()]
            if self.ranking.enabled:
                weights.append(f"ranking: {self.ranking.rank_weight:g}")
            if self.uses_base and self.ranking.base_weight != 1.0:
                weights.append(f"ranking.base_weight: {self.ranking.base_weight:g}")
            raise ValueError(f"every weight of the loss is 0 ({', '.join(weights)}): the student would not train; "
                             "give at least one term a positive weight")
        return self

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_bool(cls, value):
        # YAML's true/false (and a CLI override compile=true) arrive as booleans
        return str(value).lower() if isinstance(value, bool) else value

    @field_validator("terms", mode="before")
    @classmethod
    def _one_kind_per_term(cls, terms):
        for index, item in enumerate(terms if isinstance(terms, list) else []):
            if isinstance(item, dict) and "objective" in item and "ranking" in item:
                raise ValueError(f"item {index} has both 'objective' and 'ranking': a term is one or the other; "
                                 "choose one, or write two terms")
        return terms

    def objective_terms(self) -> list[ObjectiveTerm]:
        """The weighted objectives of the loss (the shorthand is one term of weight 1)."""
        if self.terms is not None:
            return list(self.terms)
        if self.objective is None:
            return []
        return [ObjectiveTerm.model_construct(objective=self.objective, params=self.params, weight=1.0)]

    @property
    def uses_base(self) -> bool:
        return bool(self.objective_terms()) and not (self.ranking.enabled and self.ranking.mode == "rank_only")

    def base_label(self) -> str:
        """'KL', or for composed terms 'KL+0.5CE'."""
        parts = []
        for term in self.objective_terms():
            weight = "" if term.weight == 1.0 else f"{term.weight:g}"
            parts.append(weight + term.objective.upper())
        return "+".join(parts)

    def label(self) -> str:
        """Short name used in tables: 'KL', 'KL+R', 'KL+R(dyn)', 'Rank-15', 'KL+R(pearson)'."""
        base = self.base_label()
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
