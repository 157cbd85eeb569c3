"""`TKIConfig`: `trl.SFTConfig` plus the switches and inputs of Task Knowledge Injection."""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from transformers import TrainingArguments
from trl import SFTConfig

from .flashback import DIVERGENCES
from .ivg.config import IVConfig
from .reinstatement.losses import REINSTATEMENT_TARGETS
from .reinstatement.settings import PriorInputConfig


PRIOR_INPUTS_PREFIX = "prior_inputs_"

MERGED_EXAMPLES = (
    "packing / eval_packing / padding_free merge examples into one row, but TKI routes and reinstates per example: "
    "set packing=False, eval_packing=False and padding_free=False (or lta=False and kr=False)."
)


def _prior_input_fields() -> list[tuple[str, type, dataclasses.Field]]:
    """`PriorInputConfig`'s fields as ``prior_inputs_<name>`` arguments: the stage-1 settings are declared once, in
    `PriorInputConfig`, and reach `TKIConfig` and ``tki-prepare`` from there."""
    hints = typing.get_type_hints(PriorInputConfig)
    return [
        (PRIOR_INPUTS_PREFIX + f.name, hints[f.name], field(default=f.default, metadata=dict(f.metadata)))
        for f in dataclasses.fields(PriorInputConfig)
    ]


def _prior_input_config(self) -> PriorInputConfig:
    """The stage-1 settings these arguments hold."""
    return PriorInputConfig(
        **{f.name: getattr(self, PRIOR_INPUTS_PREFIX + f.name) for f in dataclasses.fields(PriorInputConfig)}
    )


def prior_input_arguments(config: PriorInputConfig) -> dict[str, object]:
    """``config`` as the ``prior_inputs_*`` keyword arguments of `TKIConfig` (e.g. to train on a store it wrote)."""
    return {PRIOR_INPUTS_PREFIX + name: value for name, value in dataclasses.asdict(config).items()}


PriorInputArguments = dataclasses.make_dataclass(
    "PriorInputArguments",
    _prior_input_fields(),
    namespace={"prior_input_config": property(_prior_input_config), "__module__": __name__},
)
PriorInputArguments.__doc__ = "Knowledge-reinstatement stage-1 settings as ``prior_inputs_*`` arguments."


@dataclass
class TKIConfig(SFTConfig, PriorInputArguments):
    """Configuration of `TKITrainer`. Every `SFTConfig` field keeps its meaning; with ``lta``, ``kr`` and
    ``pcgrad`` off and no flashbacks the trainer is `SFTTrainer`. Like `SFTConfig`, a CPU-only machine needs
    ``use_cpu=True`` or ``bf16=False``.

    Every check that needs only the configuration runs here, at construction (PEFT's ``LoraConfig`` does the same),
    so a bad combination fails before a model or dataset is loaded. Below are the parameters TKI adds; for the others
    see `trl.SFTConfig`.

    Parameters:
        > Parameters that control latent task adaptation

        lta (`bool`, *optional*, defaults to `True`):
            Route each example to its retrieved latent LoRA increments.

        > Parameters that control knowledge reinstatement

        kr (`bool`, *optional*):
            Also train on each example's optimised prior input embeddings. Unset (`None`): on where the training rows
            have a prompt and a completion (prompt/completion, messages) and no setting rules it out, else off with
            one log line (`TKITrainer` decides, as `SFTTrainer` decides `completion_only_loss=None`).
        reinstatement_alpha (`float`, *optional*, defaults to `1.0`):
            alpha, the weight of the reinstatement loss: total = L_sft + alpha * L_reinst.
        reinstatement_target (`str`, *optional*, defaults to `"easier"`):
            Which input each example's reinstatement term trains through:

            - `"easier"`: the paper's eq. 6 as written (-max of the target's log-likelihoods), min(loss with q, loss
              with the prompt): after stage 1 mostly the prior input, a second form of input for the same target.
            - `"harder"`: eq. 6 with its minus sign dropped, max of the two losses (rarely the prior input after
              stage 1).

        prior_inputs_dir (`str`, *optional*):
            A store written by `compute_prior_inputs` / ``tki-prepare``. Unset with `kr=True`: computed at construction
            under `output_dir/_tki_cache`.
        prior_inputs_mode (`str`, *optional*, defaults to `"store"`):
            `"store"`: read prior inputs from a store (computed once); `"on_the_fly"`: run stage 1 on each batch inside
            training, for datasets whose store would not fit on disk.

        > Parameters that control knowledge-reinstatement stage 1 (the fields of `PriorInputConfig`)

        prior_inputs_steps (`int`, *optional*, defaults to `5`):
            Stage-1 Adam steps per example.
        prior_inputs_learning_rate (`float`, *optional*, defaults to `3e-4`):
            Stage-1 Adam learning rate.
        prior_inputs_wasserstein_weight (`float`, *optional*, defaults to `-1.0`):
            lam, the weight of W(q, e) in stage 1: -1, the paper's eq. 5 as written, pushes q away from the prompt;
            > 0 keeps q near it; 0 leaves W out.
        prior_inputs_wasserstein (`str`, *optional*, defaults to `"emd"`):
            How W(q, e) is computed: `"emd"` (exact) or `"sinkhorn"`.
        prior_inputs_sinkhorn_reg (`float`, *optional*, defaults to `0.05`):
            Entropic regularisation of `"sinkhorn"`.
        prior_inputs_batch_size (`int`, *optional*, defaults to `8`):
            Examples optimised together in stage 1; does not change the results.

        > Parameters that control PCGrad

        pcgrad (`bool`, *optional*, defaults to `True`):
            Project conflicting gradients of the active objectives (SFT, reinstatement, flashbacks, instruction-vector
            guidance); with only SFT active there is nothing to project.

        > Parameters that control flashbacks (Joint Flashback Adaptation)

        flashback_dataset (`str`, *optional*):
            Old tasks' prompts to keep the model's behaviour on while it learns the new rows: a local dataset folder
            or data file, or a Hub id (`TKITrainer`'s `flashback_dataset=` also takes a `Dataset`). Their completions
            are ignored.
        flashback_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the flashback divergence: total = L_sft + alpha * L_reinst + weight * L_flashback.
        flashbacks_per_step (`int`, *optional*, defaults to `1`):
            Flashback prompts drawn for each training micro-batch (one more forward).
        flashback_divergence (`str`, *optional*, defaults to `"symmetric_kl"`):
            Divergence of the model's next-token distributions from the reference's at the flashback positions,
            averaged per flashback, then over flashbacks: `"symmetric_kl"` (KL(reference || model) + KL(model ||
            reference), the paper's), `"kl"` (KL(reference || model)), `"reverse_kl"` or `"js"`.
        flashback_continuation_tokens (`int`, *optional*, defaults to `0`):
            Also compare over a continuation of this many tokens that the reference generates once per flashback
            (greedy, cached under `output_dir/_tki_cache`); 0: the prompt's positions only.
        flashback_routing (`bool`, *optional*, defaults to `True`):
            With `lta`: route flashbacks through the latent bank by their own queries and groups, jointly with the new
            rows (joint latent task learning); `False`: flashbacks bypass the bank (the ablation).

        > Parameters that control instruction-vector guidance (IVG)

        ivg_vector (`str`, *optional*):
            Directory of an `InstructionVector` (`extract_instruction_vector`, `python -m tki_trainer.ivg`): guide
            training with it (progressive intervention and the KL term). Unset: no guidance.
        ivg_tasks (`str`, *optional*):
            Instead of `ivg_vector`: rows of tasks (task, input, output; a data file or a saved dataset folder) to
            extract the vector from, with the model before training, at construction (resumable, cached under
            `output_dir/_tki_cache`).
        ivg_extraction (`str`, *optional*):
            `IVConfig` settings for extraction from `ivg_tasks`, as JSON (e.g. `'{"shots": 5}'`); unset: the paper's.
        ivg_task (`str`, *optional*):
            Which task's vector guides training; unset: the only task's, or the mean of the tasks' vectors.
        ivg_scale_start (`float`, *optional*, defaults to `1.0`):
            Scale of the vector added at the last prompt token at the first step (paper: 1).
        ivg_scale_end (`float`, *optional*, defaults to `0.0`):
            Scale at the last step (paper: 0); linear in between.
        ivg_kl_weight (`float`, *optional*, defaults to `0.05`):
            Weight of the KL term between the model's output and the reference's with the vector (paper: 0.05, from
            1 / 0.5 / 0.25 / 0.05 / 0.01); 0 leaves it out.
        ivg_kl_positions (`str`, *optional*, defaults to `"both"`):
            Where the KL term compares: `"answer"` (the first answer token's prediction), `"all"` (averaged over the
            answer's positions) or `"both"` (their sum, the authors' code; the paper does not say).
        ivg_kl_temperature (`float`, *optional*, defaults to `2.0`):
            Softmax temperature of both distributions in the KL term (the authors' code; the paper does not say).
        ivg_kl_hinge (`float`, *optional*, defaults to `0.1`):
            Each row's KL term counts only above this value (the authors' code; the paper does not say); 0: plain.

        > Parameters that control query encoding and the dataset columns

        query_encoder (`str`, *optional*, defaults to `"FacebookAI/roberta-base"`):
            Sentence encoder for query embeddings the dataset lacks: a sentence-transformers name or path, or
            `"embedded"` for the packaged all-MiniLM-L6-v2. The paper uses RoBERTa-base.
        query_embedding_column (`str`, *optional*, defaults to `"query_embedding"`):
            Column of query embeddings.
        group_id_column (`str`, *optional*, defaults to `"group_id"`):
            Column of latent-task group ids; absent: a seeded hash of the id.
        id_column (`str`, *optional*, defaults to `"id"`):
            Column of stable, unique example ids; absent: a hash of the row's content.

        > Parameters whose values TKI restricts

        hub_strategy (`str`, *optional*, defaults to `"end"`):
            With `push_to_hub`: `"end"` (the only strategy `TKITrainer` takes) pushes once, through
            `trainer.push_to_hub`; the `Trainer`'s others push its pickled state during training.
    """

    # The three mechanisms
    lta: bool = field(
        default=True,
        metadata={"help": "Latent task adaptation: route each example to its retrieved latent LoRA increments."},
    )
    kr: Optional[bool] = field(
        default=None,
        metadata={
            "help": "Knowledge reinstatement: also train on each example's optimised prior input embeddings. Unset "
            "(None): on where the training rows have a prompt and a completion (prompt/completion, messages) and no "
            "setting rules it out, else off with one log line (TKITrainer decides, as SFTTrainer decides "
            "completion_only_loss=None)."
        },
    )
    pcgrad: bool = field(
        default=True,
        metadata={
            "help": "Project conflicting gradients of the active objectives (SFT, reinstatement, flashbacks, "
            "instruction-vector guidance: PCGrad); with only SFT active there is nothing to project."
        },
    )
    reinstatement_alpha: float = field(
        default=1.0, metadata={"help": "alpha: weight of the reinstatement loss, total = L_sft + alpha * L_reinst."}
    )
    reinstatement_target: str = field(
        default="easier",
        metadata={
            "help": "Which input each example's reinstatement term trains through. 'easier': the paper's eq. 6 as "
            "written (-max of the target's log-likelihoods), min(loss with q, loss with the prompt): after stage 1 "
            "mostly the prior input, a second form of input for the same target. 'harder': eq. 6 with its minus "
            "sign dropped, max of the two losses (rarely the prior input after stage 1).",
            "choices": list(REINSTATEMENT_TARGETS),
        },
    )

    # Inputs TKI computes when the dataset lacks them
    query_encoder: str = field(
        default="FacebookAI/roberta-base",
        metadata={
            "help": "Sentence encoder for query embeddings the dataset lacks: a sentence-transformers name or path, "
            "or 'embedded' for the packaged all-MiniLM-L6-v2. The paper uses RoBERTa-base."
        },
    )
    prior_inputs_dir: Optional[str] = field(
        default=None,
        metadata={
            "help": "A store written by compute_prior_inputs / tki-prepare. Unset with kr=True: computed at "
            "construction under output_dir/_tki_cache."
        },
    )
    prior_inputs_mode: str = field(
        default="store",
        metadata={
            "help": "'store': read prior inputs from a store (computed once); 'on_the_fly': run stage 1 on each "
            "batch inside training, for datasets whose store would not fit on disk.",
            "choices": ["store", "on_the_fly"],
        },
    )

    # Flashbacks (Joint Flashback Adaptation)
    flashback_dataset: Optional[str] = field(
        default=None,
        metadata={
            "help": "Old tasks' prompts to keep the model's behaviour on while it learns the new rows: a local "
            "dataset folder or data file, or a Hub id (TKITrainer's flashback_dataset= also takes a Dataset). Their "
            "completions are ignored."
        },
    )
    flashback_weight: float = field(
        default=1.0,
        metadata={
            "help": "Weight of the flashback divergence: total = L_sft + alpha * L_reinst + weight * L_flashback."
        },
    )
    flashbacks_per_step: int = field(
        default=1, metadata={"help": "Flashback prompts drawn for each training micro-batch (one more forward)."}
    )
    flashback_divergence: str = field(
        default="symmetric_kl",
        metadata={
            "help": "Divergence of the model's next-token distributions from the reference's at the flashback "
            "positions, averaged per flashback, then over flashbacks: 'symmetric_kl' (KL(reference || model) + "
            "KL(model || reference), the paper's), 'kl' (KL(reference || model)), 'reverse_kl' or 'js'.",
            "choices": list(DIVERGENCES),
        },
    )
    flashback_continuation_tokens: int = field(
        default=0,
        metadata={
            "help": "Also compare over a continuation of this many tokens that the reference generates once per "
            "flashback (greedy, cached under output_dir/_tki_cache); 0: the prompt's positions only."
        },
    )
    flashback_routing: bool = field(
        default=True,
        metadata={
            "help": "With lta: route flashbacks through the latent bank by their own queries and groups, jointly with "
            "the new rows (joint latent task learning); False: flashbacks bypass the bank (the ablation)."
        },
    )

    # Instruction-vector guidance
    ivg_vector: Optional[str] = field(
        default=None,
        metadata={
            "help": "Directory of an InstructionVector (extract_instruction_vector, python -m tki_trainer.ivg): guide "
            "training with it (progressive intervention and the KL term). Unset: no guidance."
        },
    )
    ivg_tasks: Optional[str] = field(
        default=None,
        metadata={
            "help": "Instead of ivg_vector: rows of tasks (task, input, output; a data file or a saved dataset "
            "folder) to extract the vector from, with the model before training, at construction (resumable, "
            "cached under output_dir/_tki_cache)."
        },
    )
    ivg_extraction: Optional[str] = field(
        default=None,
        metadata={
            "help": "IVConfig settings for extraction from ivg_tasks, as JSON (e.g. '{\"shots\": 5}'); unset: the "
            "paper's."
        },
    )
    ivg_task: Optional[str] = field(
        default=None,
        metadata={
            "help": "Which task's vector guides training; unset: the only task's, or the mean of the tasks' vectors."
        },
    )
    ivg_scale_start: float = field(
        default=1.0,
        metadata={"help": "Scale of the vector added at the last prompt token at the first step (paper: 1)."},
    )
    ivg_scale_end: float = field(
        default=0.0, metadata={"help": "Scale at the last step (paper: 0); linear in between."}
    )
    ivg_kl_weight: float = field(
        default=0.05,
        metadata={
            "help": "Weight of the KL term between the model's output and the reference's with the vector (paper: "
            "0.05, from 1 / 0.5 / 0.25 / 0.05 / 0.01); 0 leaves it out."
        },
    )
    ivg_kl_positions: str = field(
        default="both",
        metadata={
            "help": "Where the KL term compares: 'answer' (the first answer token's prediction), 'all' (averaged over "
            "the answer's positions) or 'both' (their sum, the authors' code; the paper does not say).",
            "choices": ["answer", "all", "both"],
        },
    )
    ivg_kl_temperature: float = field(
        default=2.0,
        metadata={
            "help": "Softmax temperature of both distributions in the KL term (the authors' code; the paper does not "
            "say)."
        },
    )
    ivg_kl_hinge: float = field(
        default=0.1,
        metadata={
            "help": "Each row's KL term counts only above this value (the authors' code; the paper does not say); 0: "
            "plain."
        },
    )

    # Dataset columns
    query_embedding_column: str = field(default="query_embedding", metadata={"help": "Column of query embeddings."})
    group_id_column: str = field(
        default="group_id", metadata={"help": "Column of latent-task group ids; absent: a seeded hash of the id."}
    )
    id_column: str = field(
        default="id", metadata={"help": "Column of stable, unique example ids; absent: a hash of the row's content."}
    )

    hub_strategy: str = field(
        default="end",
        metadata={
            "help": "With push_to_hub: 'end' (the only strategy TKITrainer takes) pushes once, through "
            "trainer.push_to_hub; the Trainer's others push its pickled state during training.",
            "choices": ["end"],
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_prior_inputs()
        if self.prior_inputs_mode not in ("store", "on_the_fly"):
            raise ValueError(f"prior_inputs_mode must be 'store' or 'on_the_fly', got {self.prior_inputs_mode!r}.")
        if self.reinstatement_alpha < 0:
            raise ValueError(f"reinstatement_alpha must be >= 0, got {self.reinstatement_alpha}.")
        if self.reinstatement_target not in REINSTATEMENT_TARGETS:
            raise ValueError(
                f"reinstatement_target must be one of {REINSTATEMENT_TARGETS}, got {self.reinstatement_target!r}: "
                "'easier' is the paper's eq. 6 as written, 'harder' the reading without its minus sign."
            )
        if self.lta and (self.packing or self.eval_packing or self.padding_free):
            raise ValueError(MERGED_EXAMPLES)
        if self.lta and self.optim not in ("adamw_torch", "adamw_torch_fused"):
            raise ValueError(
                f"lta=True trains the latent bank with row-sparse gradients, which optim={self.optim!r} does not take: "
                "use optim='adamw_torch' (the bank then gets lazy AdamW updates), or pass an optimizer that accepts "
                "sparse gradients to TKITrainer through `optimizers=` and leave optim at 'adamw_torch'."
            )
        engine = self._engine()
        if engine and self.lta:
            raise ValueError(
                f"{engine} reduces and shards gradients itself, and the latent bank's gradients are row-sparse: "
                "train LTA with DDP (accelerate launch --config_file recipes/accelerate/ddp.yaml), or set lta=False."
            )
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length={self.max_length} leaves no room for a token: use a positive max_length.")
        self._check_flashbacks()
        self._check_guidance()
        if self.flashback_dataset is not None:
            self.check_flashback_engine()
        if self.push_to_hub and self.hub_strategy != "end":
            raise ValueError(
                f"hub_strategy={self.hub_strategy!r} pushes during training, which uploads the Trainer's pickled "
                "state (training_args.bin, checkpoints): TKITrainer pushes once, with hub_strategy='end'."
            )
        if self.kr is False:
            return
        if self.prior_inputs_mode == "on_the_fly" and self.prior_inputs_dir is not None:
            raise ValueError(
                "prior_inputs_mode='on_the_fly' runs stage 1 on each batch and reads no store: unset prior_inputs_dir, "
                "or use prior_inputs_mode='store' to train on it."
            )
        if self.prior_inputs_dir is not None and not Path(self.prior_inputs_dir, "store.json").is_file():
            raise ValueError(
                f"prior_inputs_dir={self.prior_inputs_dir} holds no prior-input store (no store.json): write one with "
                "tki_trainer.compute_prior_inputs or tki-prepare, or leave prior_inputs_dir unset to compute it."
            )
        conflict = self.kr_conflict()
        if self.kr and conflict is not None:
            raise ValueError(conflict)

    def kr_conflict(self) -> str | None:
        """The refusal (naming the fix) of the first setting here that knowledge reinstatement cannot honour, or
        None. ``kr=True`` with one is refused at construction; ``kr=None`` resolves to off (`TKITrainer`)."""
        engine = self._engine()
        conflicts = (
            (self.packing or self.eval_packing or self.padding_free, MERGED_EXAMPLES),
            (
                engine and self.pcgrad,
                f"PCGrad needs each objective's full gradient, which {engine} shards and reduces itself: set "
                "pcgrad=False (KR still works) or train with DDP.",
            ),
            (
                self.neftune_noise_alpha is not None,
                "NEFTune noises the input embeddings, so the prior input q = e + (q - e) would no longer be the one "
                "stage 1 optimised: set neftune_noise_alpha=None, or kr=False.",
            ),
            (
                self.truncation_mode != "keep_start",
                f"truncation_mode={self.truncation_mode!r}: knowledge reinstatement keeps each prompt's span as "
                "truncation_mode='keep_start' leaves it; use that (cut long prompts from the left before training "
                "with tki_trainer.data.fit_prompts), or set kr=False.",
            ),
            (
                self.completion_only_loss is False,
                "Knowledge reinstatement acts on the completion span only: set completion_only_loss=True (or leave "
                "it unset), or kr=False.",
            ),
            (
                self.assistant_only_loss,
                "assistant_only_loss trains every assistant turn, while knowledge reinstatement splits each "
                "conversation at its last assistant turn: set assistant_only_loss=False, or kr=False.",
            ),
            (
                self.label_smoothing_factor > 0,
                "label_smoothing_factor needs the full logits, while knowledge reinstatement compares per-example "
                "losses from TRL's fused LM head: set label_smoothing_factor=0 (loss_type='dft' works) or kr=False.",
            ),
            (
                self.pcgrad and self.activation_offloading,
                "PCGrad takes a backward pass per objective through graphs that activation offloading moves off "
                "the device: set activation_offloading=False, or pcgrad=False.",
            ),
        )
        return next((message for found, message in conflicts if found), None)

    @property
    def guided(self) -> bool:
        """Whether instruction-vector guidance trains: a vector, or tasks to extract one from."""
        return self.ivg_vector is not None or self.ivg_tasks is not None

    def _check_guidance(self) -> None:
        """Instruction-vector guidance's settings (the vector itself is read and checked by the trainer)."""
        if self.ivg_vector is not None and self.ivg_tasks is not None:
            raise ValueError("Pass ivg_vector (a saved vector) or ivg_tasks (tasks to extract it from), not both.")
        if self.ivg_extraction is not None:
            if self.ivg_tasks is None:
                raise ValueError("ivg_extraction sets how a vector is extracted from ivg_tasks: pass ivg_tasks too.")
            try:
                IVConfig(**json.loads(self.ivg_extraction))
            except (json.JSONDecodeError, TypeError) as error:
                raise ValueError(
                    f"ivg_extraction={self.ivg_extraction!r} is not a JSON object of IVConfig fields ({error})."
                ) from None
        if self.guided:
            engine = self._engine()
            if engine:
                raise ValueError(
                    f"Instruction-vector guidance takes its own backward pass each micro-batch, and {engine} owns "
                    "backward and gradient reduction: train with DDP (accelerate launch --config_file "
                    "recipes/accelerate/ddp.yaml)."
                )
            if self.packing or self.padding_free or self.completion_only_loss is False:
                raise ValueError(
                    "Instruction-vector guidance adds the vector at each row's last prompt token, one prompt per row "
                    "masked out of the loss: set packing=False, padding_free=False and leave completion_only_loss on."
                )
            if self.kr is not False and self.prior_inputs_mode == "on_the_fly":
                raise ValueError(
                    "prior_inputs_mode='on_the_fly' runs stage 1 inside the training step, where the guidance adds "
                    "its vector, so the prior inputs would differ from a store's: use prior_inputs_mode='store' with "
                    "ivg_vector, or kr=False."
                )
        if self.ivg_kl_positions not in ("answer", "all", "both"):
            raise ValueError(f"ivg_kl_positions must be 'answer', 'all' or 'both', got {self.ivg_kl_positions!r}.")
        low = [
            f"{name}={getattr(self, name)}" for name in ("ivg_kl_weight", "ivg_kl_hinge") if getattr(self, name) < 0
        ]
        if self.ivg_kl_temperature <= 0:
            low.append(f"ivg_kl_temperature={self.ivg_kl_temperature} (must be > 0)")
        if low:
            raise ValueError(f"Instruction-vector guidance: {', '.join(low)}: use values >= 0.")

    def _check_prior_inputs(self) -> None:
        """Refuse ``prior_inputs_*`` values that `PriorInputConfig` refuses, at construction rather than when stage 1
        runs."""
        _prior_input_config(self)

    def _check_flashbacks(self) -> None:
        if self.flashback_weight < 0:
            raise ValueError(f"flashback_weight must be >= 0, got {self.flashback_weight}.")
        if self.flashbacks_per_step < 1 or self.flashback_continuation_tokens < 0:
            raise ValueError("flashbacks_per_step must be at least 1 and flashback_continuation_tokens at least 0.")
        if self.max_length is not None and self.flashback_continuation_tokens >= self.max_length:
            raise ValueError(
                f"flashback_continuation_tokens={self.flashback_continuation_tokens} leaves no room for the prompt "
                f"within max_length={self.max_length}: use fewer continuation tokens."
            )
        if self.flashback_divergence not in DIVERGENCES:
            raise ValueError(f"flashback_divergence must be one of {DIVERGENCES}, got {self.flashback_divergence!r}.")

    def check_flashback_engine(self) -> None:
        """Flashbacks (given here or to the trainer) need an engine that leaves backward and reduction to it."""
        engine = self._engine()
        if engine:
            raise ValueError(
                f"Flashbacks take their own backward pass each micro-batch, and {engine} owns backward and gradient "
                "reduction: train with DDP (accelerate launch --config_file recipes/accelerate/ddp.yaml)."
            )

    def _engine(self) -> str | None:
        """DeepSpeed or FSDP when either will own gradient reduction: from the arguments, or from the environment
        that ``accelerate launch --config_file <deepspeed or fsdp config>`` sets."""
        if self.deepspeed or self.deepspeed_plugin is not None:
            return "DeepSpeed"
        if self.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes"):
            return "FSDP"
        return None


def as_tki_config(args: TrainingArguments | None) -> TKIConfig:
    """``args`` as a `TKIConfig`: `TrainingArguments` (or an `SFTConfig`) converted as SFTTrainer converts them, with
    TKI's fields at their defaults."""
    if args is None:
        return TKIConfig(output_dir="tki-output")
    if isinstance(args, TKIConfig):
        return args
    return TKIConfig(**{**args.to_dict(), "hub_token": args.hub_token})
