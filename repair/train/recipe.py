"""Fine-tuning recipes: validated YAML (pydantic) for LoRA and full fine-tunes."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from repair.errors import RepairError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraRecipe(_Strict):
    r: int = Field(ge=1)
    alpha: float | Literal["2r"] = Field("2r", description="a number, or '2r' as in the paper")
    rslora: bool = False
    target_modules: list[str] = Field(min_length=1)
    train_b_only: bool = Field(False, description="freeze A with all singular values 1 and train B (Fig. 10)")

    @property
    def lora_alpha(self) -> float:
        return 2.0 * self.r if self.alpha == "2r" else float(self.alpha)


class GeneratedData(_Strict):
    task: Literal["addition", "difference", "joining"] = Field(description="a Zorblax task of repair/train/taskgen.py")
    n: int = Field(gt=0)
    seed: int = 0


class DataRecipe(_Strict):
    generated: GeneratedData | None = None
    jsonl: Path | None = Field(None, description="records with 'prompt' and 'completion'")

    @model_validator(mode="after")
    def _one_source(self) -> DataRecipe:
        if (self.generated is None) == (self.jsonl is None):
            raise ValueError("give exactly one of 'generated' or 'jsonl'")
        return self


class StageRecipe(DataRecipe):
    """One stage of a continual-learning recipe: its data, and the lm-eval task that measures it."""

    eval_task: str | None = Field(None, description="default: the generated task's name")

    @model_validator(mode="after")
    def _has_task(self) -> StageRecipe:
        if self.eval_task is None and self.generated is None:
            raise ValueError("a stage with jsonl data needs an 'eval_task'")
        return self

    @property
    def task(self) -> str:
        if self.eval_task is not None:
            return self.eval_task
        return self.generated.task


class StageRepair(_Strict):
    """Continual learning: rescale the intruders (against the original base) after every stage."""

    scale: float = Field(ge=0, le=1, description="λ: 0 removes the intruders, 1 leaves them")
    per_matrix: int | None = Field(None, ge=1, description="only the N top-ranked intruders of each matrix")


class TrainRecipe(_Strict):
    steps: int = Field(gt=0)
    batch_size: int = Field(16, gt=0)
    learning_rate: float = Field(gt=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_length: int = Field(64, gt=1)
    save_steps: list[int] = Field(default_factory=list, description="also save checkpoints at these steps")
    logging_steps: int = Field(10, gt=0)
    intruders_every: int | None = Field(
        25, gt=0, description="LoRA: count intruders every N steps, at save_steps and at the end (IntruderMonitor); "
                              "null: no monitor")


class Recipe(_Strict):
    name: str
    base: str = "smollm2-135m"
    method: Literal["lora", "full"]
    seed: int = 0
    lora: LoraRecipe | None = None
    data: DataRecipe | None = None
    stages: list[StageRecipe] | None = Field(
        None, min_length=1, description="continual learning: trained one after another, each for train.steps (LoRA: "
                                        "merged and re-initialised after each); `repair continual` runs them")
    repair: StageRepair | None = Field(None, description="with stages: rescale intruders after each stage")
    train: TrainRecipe
    eval_task: str | None = Field("addition", description="lm-eval task for recipes/README.md measurements")

    @model_validator(mode="after")
    def _lora_iff_method(self) -> Recipe:
        if (self.method == "lora") != (self.lora is not None):
            raise ValueError("method 'lora' needs a 'lora' section, and only it")
        if any(s > self.train.steps for s in self.train.save_steps):
            raise ValueError("train.save_steps must not exceed train.steps")
        if (self.data is None) == (self.stages is None):
            raise ValueError("give exactly one of 'data' (one fine-tune) or 'stages' (continual learning)")
        if self.repair is not None and self.stages is None:
            raise ValueError("'repair' applies between stages: it needs 'stages'")
        if self.stages is not None and self.train.save_steps:
            raise ValueError("train.save_steps saves one fine-tune's checkpoints; with 'stages' every stage is "
                             "written whole (DIR/stage-N), so leave it out")
        return self


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """``data`` with each ``KEY.PATH=VALUE`` set (VALUE read as YAML: ``lora.r=4``, ``lora.alpha=2r``)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise RepairError(f"set {item!r}: expected KEY=VALUE with a dotted recipe field, e.g. lora.r=4.")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise RepairError(f"set {item!r}: the value is not valid YAML ({str(e).splitlines()[0]}).") from e
        node = data
        for part in parts[:-1]:
            node = _child(node, part, item)
        if isinstance(node, list):
            node[_list_index(node, parts[-1], item)] = value
        else:
            node[parts[-1]] = value
    return data


def _child(node, part: str, item: str):
    """``node[part]`` for ``--set``: a section (created when missing) or a list item (``stages.1.eval_task``)."""
    child = node[_list_index(node, part, item)] if isinstance(node, list) else node.setdefault(part, {})
    if not isinstance(child, dict | list):
        raise RepairError(f"set {item!r}: recipe field {part!r} is not a section.")
    return child


def _list_index(node: list, part: str, item: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise RepairError(f"set {item!r}: {part!r} is not an index of a list of {len(node)} items.")
    return int(part)


def load_recipe(path: Path | str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Parse and validate a recipe, with ``--set`` overrides applied first; errors name the file and the
    offending field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise RepairError(f"{path}: cannot be read ({e.strerror}).") from e
    except yaml.YAMLError as e:
        raise RepairError(f"{path}: not valid YAML ({str(e).splitlines()[0]}).") from e
    if not isinstance(data, dict):
        raise RepairError(f"{path}: expected a mapping of recipe fields at the top level.")
    data = apply_overrides(data, overrides)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "recipe"
        raise RepairError(f"{path}: {where}: {err['msg']}.") from e
    for data in [recipe.data, *(recipe.stages or [])]:
        if data is not None and data.jsonl is not None and not data.jsonl.is_absolute():
            data.jsonl = (path.parent / data.jsonl).resolve()
    for stage in recipe.stages or []:  # a task YAML, like the data, is found beside the recipe
        if stage.eval_task and stage.eval_task.endswith((".yaml", ".yml")) and not Path(stage.eval_task).is_absolute():
            stage.eval_task = str((path.parent / stage.eval_task).resolve())
    return recipe
