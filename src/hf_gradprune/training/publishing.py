"""What :class:`PruningMixin` publishes: ``save_model`` with the pruning model card and head heatmap,
``export_vanilla``, ``create_model_card``, and ``push_to_hub`` of the model or of each checkpoint in one
commit, from snapshots that agree."""

from __future__ import annotations

import functools
import logging
import os
import shutil
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, HfApi
from transformers.modelcard import extract_hyperparameters_from_trainer, parse_log_history
from transformers.trainer_utils import HubStrategy, SaveStrategy
from transformers.utils.hub import PushInProgress

from ..core.record import PruningRecord
from ..io.cards import create_pruning_model_card
from ..io.export import export_vanilla
from ..io.figures import save_head_importance_heatmap
from ..io.hub import push_folder_to_hub, resolve_token, staged_copy
from .checkpoints import TRAINING_STATE_FILES
from .reporting import PRUNING_METRICS

HEATMAP_FILENAME = "head_importance.png"
# The arguments of `Trainer.create_model_card`, in its order: what `push_to_hub(**kwargs)` passes on.
CARD_FIELDS = (
    "language",
    "license",
    "tags",
    "model_name",
    "finetuned_from",
    "tasks",
    "dataset_tags",
    "dataset",
    "dataset_args",
)
# Files of the repository's root that a push of a model replaces: one it does not write is deleted.
ROOT_MODEL_FILES = ("*.safetensors", "*.safetensors.index.json", HEATMAP_FILENAME, "README.md")

logger = logging.getLogger(__name__)


def _as_list(value: str | list[str] | None) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _timing_or_pruning(metric: str) -> bool:
    """A pruning metric, or the time the Trainer took to prepare the model (logged with every evaluation
    once the model was evaluated before training): not a column of the card's training results."""
    return metric.startswith(PRUNING_METRICS) or metric.endswith("_model_preparation_time")


def _after_push(staged: Path, what: str, job: Future) -> None:
    """After a background upload: remove its snapshot, and say if it failed (nothing else reads the
    ``Trainer``'s push futures)."""
    shutil.rmtree(staged, ignore_errors=True)
    if not job.cancelled() and job.exception() is not None:
        logger.error("Pushing %s to the Hub failed: %s", what, job.exception())


class PublishingMixin:
    """Saving, model cards and Hub pushes of a pruned model, for :class:`PruningMixin`."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model``, plus the model card and heatmap (not in periodic checkpoints); with
        ``--export_vanilla``, an ordinary transformers checkpoint (:meth:`export_vanilla`). With
        ``args.push_to_hub``, then :meth:`push_to_hub` as the ``Trainer`` does."""
        if _internal_call:
            super().save_model(output_dir, _internal_call=True)
            return
        self._save_with_card(output_dir)
        if self.args.push_to_hub:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_with_card(self, output_dir: str | None = None, repo_id: str | None = None) -> None:
        if self.pruning_args.export_vanilla:
            self.export_vanilla(output_dir, repo_id)
            return
        super().save_model(output_dir, _internal_call=True)
        self._write_model_card(output_dir, repo_id)

    def export_vanilla(self, output_dir: str | None = None, repo_id: str | None = None) -> None:
        """Write the model as an ordinary transformers checkpoint (:func:`hf_gradprune.export_vanilla`), with
        the tokenizer or processor and the model card, into ``output_dir`` (default ``args.output_dir``)."""
        if not self.is_world_process_zero():
            return
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        export_vanilla(self.model, folder, **self._card_arguments(folder, repo_id))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(folder)

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """``Trainer.create_model_card``: the pruning card (:func:`hf_gradprune.create_pruning_model_card`)
        into ``args.output_dir``, as ``README.md`` beside the heatmap, with the ``Trainer``'s fields merged
        in. The fields given are kept for the cards of later saves and pushes.

        Args:
            language (`str`, *optional*): the language of the model, e.g. ``"en"``.
            license (`str`, *optional*): the license id, e.g. ``"apache-2.0"``.
            tags (`str` or `list[str]`, *optional*): tags for the card's metadata.
            model_name (`str`, *optional*): the card's title and model-index name.
            finetuned_from (`str`, *optional*): the model that was fine-tuned and pruned; a Hub id becomes the
                card's ``base_model``, a local folder "a local checkpoint" (defaults to the model's
                ``config._name_or_path``).
            tasks (`str` or `list[str]`, *optional*): the task(s); the first is the ``pipeline_tag``
                (defaults to the task of the model's head).
            dataset_tags (`str` or `list[str]`, *optional*): Hub id(s) of the dataset(s), for the metadata and
                the model-index (defaults to ``dataset_name`` given to the trainer).
            dataset (`str` or `list[str]`, *optional*): the name shown for each dataset (``"GLUE MRPC"``).
            dataset_args (`str` or `list[str]`, *optional*): each dataset's configuration (``"mrpc"``).
        """
        self._remember_card_fields(
            language=language,
            license=license,
            tags=tags,
            model_name=model_name,
            finetuned_from=finetuned_from,
            tasks=tasks,
            dataset_tags=dataset_tags,
            dataset=dataset,
            dataset_args=dataset_args,
        )
        self._write_model_card(self.args.output_dir, self.hub_model_id)

    def _remember_card_fields(self, **fields: Any) -> None:
        unknown = sorted(set(fields) - set(CARD_FIELDS))
        if unknown:
            raise TypeError(
                f"Unexpected model card arguments {unknown}: the Trainer's card takes "
                f"{', '.join(CARD_FIELDS)}."
            )
        self.card_fields.update({k: v for k, v in fields.items() if v is not None})

    def _write_model_card(
        self, output_dir: str | os.PathLike | None = None, repo_id: str | None = None, write: bool = True
    ) -> None:
        """Write ``README.md`` (and ``head_importance.png`` when heads were scored) into ``output_dir``. Under
        FSDP2 every rank builds the card (counting the zeros of sharded weights takes them all) and the first
        writes it, unless ``write`` is false (it then only takes part)."""
        if not (self.is_world_process_zero() or self.is_fsdp_enabled):
            return
        write = write and self.is_world_process_zero()
        folder = Path(output_dir if output_dir is not None else self.args.output_dir)
        card = create_pruning_model_card(
            self.model,
            vanilla=self.pruning_args.export_vanilla,
            **self._card_arguments(folder if write else None, repo_id),
        )
        if write:
            card.save(folder / "README.md")

    def _card_arguments(self, folder: Path | None, repo_id: str | None) -> dict[str, Any]:
        """What the trainer knows for the model card, with the ``Trainer``'s card fields given to
        :meth:`create_model_card` or :meth:`push_to_hub`; writes the heatmap into ``folder`` when heads were
        scored (``None``: the card is built but not written, as on every process but the first)."""
        heatmap = None
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        if self.pruning_callback.head_importance is not None and folder is not None:
            shown = (
                self.pruning_callback.head_importance.clone()
            )  # scores at the last cut; removed heads grey
            for layer, heads in PruningRecord.from_config(self.model.config).pruned_heads.items():
                shown[layer, heads] = float("nan")
            save_head_importance_heatmap(shown, folder / HEATMAP_FILENAME)
            heatmap = HEATMAP_FILENAME
        fields, history = self.card_fields, self.state.log_history
        model_tags = getattr(self.model, "model_tags", None) or []
        repo_id = repo_id or self.hub_model_id or self.args.hub_model_id
        name_or_path = getattr(getattr(self.model, "config", None), "_name_or_path", None) or None
        return {
            "base_model": fields.get("finetuned_from", name_or_path),
            "task": fields.get("tasks"),
            "dataset_name": fields.get("dataset_tags", self.dataset_name),
            "dataset_pretty_name": fields.get("dataset"),
            "dataset_args": fields.get("dataset_args"),
            "language": fields.get("language"),
            "license": fields.get("license"),
            # with the host trainer's (trl's "trl", "sft"), as its own card would have them
            "tags": list(dict.fromkeys([*_as_list(fields.get("tags")), *model_tags])) or None,
            # As the Trainer names it: the repository's name, else the output folder's (never its path).
            "model_name": fields.get("model_name")
            or (repo_id or Path(self.args.output_dir).name).split("/")[-1],
            "hyperparameters": extract_hyperparameters_from_trainer(self),
            "training_results": parse_log_history(
                [{k: v for k, v in entry.items() if not _timing_or_pruning(k)} for entry in history]
            )[1],
            "pruning_args": self.pruning_args.to_dict(),
            "argument_defaults": type(self.pruning_args).defaults(),
            "params_before": self.params_before,
            "eval_before": self.eval_before,
            "eval_pruned": self.eval_pruned,
            "eval_after": self.eval_after,
            "speedup": self.speedup or self.pruning_callback.speedup,
            "heatmap_filename": heatmap,
            "repo_id": repo_id,
            "flops_seq_len": self.pruning_args.flops_seq_len,
        }

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs: Any,
    ) -> CommitInfo | Future | None:
        """``Trainer.push_to_hub``: save the model, masks, card and heatmap into ``args.output_dir`` and
        upload them in one commit to ``args.hub_model_id`` (default: the output folder's name in the token
        owner's namespace). Checkpoints, logs and pickles stay local.

        Args:
            commit_message (`str`, *optional*, defaults to `"End of training"`): the commit title.
            blocking (`bool`, *optional*, defaults to `True`): wait for the upload; otherwise return a
                ``Future`` of the commit.
            token (`str`, *optional*): a token with write access; defaults to ``args.hub_token``, then
                huggingface_hub's (``HF_TOKEN``, ``hf auth login``).
            revision (`str`, *optional*): the branch to commit to; defaults to ``args.hub_revision``.
            private (`bool`, *optional*): visibility of a repository created now (``args.hub_private_repo``).
            kwargs: the card's fields, as for :meth:`create_model_card` (``finetuned_from``, ``tasks``,
                ``dataset_tags``, ``dataset``, ``dataset_args``, ``language``, ``license``, ``tags``,
                ``model_name``).

        Returns:
            `huggingface_hub.CommitInfo` (a ``Future`` of it when ``blocking=False``), ``None`` off rank 0.
        """
        self._remember_card_fields(**kwargs)  # an unknown field fails before anything is saved or sent
        token = resolve_token(token if token is not None else self.args.hub_token, self._repo_name())
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        self._finish_current_push()  # a checkpoint's upload goes first, whole
        self._save_with_card(repo_id=self.hub_model_id)
        if not self.is_world_process_zero():
            return None
        push = functools.partial(
            push_folder_to_hub,
            self.args.output_dir,
            self.hub_model_id,
            token=token,
            commit_message=commit_message or "End of training",
            revision=revision if revision is not None else self.args.hub_revision,
        )
        return push() if blocking else self._hub_api.run_as_future(push)

    def _repo_name(self) -> str:
        return self.args.hub_model_id or Path(self.args.output_dir).absolute().name

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """``Trainer._push_from_checkpoint`` (``hub_strategy`` ``every_save``, ``checkpoint``,
        ``all_checkpoints``), for pruned models: the repository's root becomes the checkpoint's model
        (weights, pruning record, masks, tokenizer) with a card of that model, in one commit that deletes a
        masks file or shard the checkpoint does not have; ``checkpoint`` and ``all_checkpoints`` then push the
        whole checkpoint to ``last-checkpoint`` (replaced whole) or ``checkpoint-N``. Both uploads run in the
        background from a snapshot of the checkpoint (hard links), so training, saves and checkpoint
        rotation go on without changing what is being sent; ``output_dir`` itself is left to
        :meth:`save_model`. As in the ``Trainer``, a save while an upload is running pushes nothing unless
        ``args.hub_always_push``. Under FSDP2 every rank takes part in the card; the first pushes."""
        if self.args.hub_strategy == HubStrategy.END:
            return
        first = self.is_world_process_zero()  # the only one that pushes, and knows its push in progress
        busy = first and self.push_in_progress is not None and not self.push_in_progress.is_done()
        if not first or (busy and not self.args.hub_always_push):
            if self.is_fsdp_enabled:  # counting the zeros of sharded weights for the card takes every rank
                self._write_model_card(repo_id=self.hub_model_id, write=False)
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        output_dir = Path(self.args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        root = staged_copy(checkpoint_folder, output_dir, exclude=TRAINING_STATE_FILES)
        self._write_model_card(root, self.hub_model_id)
        if self.args.save_strategy == SaveStrategy.STEPS:
            message = f"Training in progress, step {self.state.global_step}"
        else:
            message = f"Training in progress, epoch {int(self.state.epoch)}"
        pushes = [(root, "", ROOT_MODEL_FILES, message)]
        if self.args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            folder = "last-checkpoint" if self.args.hub_strategy == HubStrategy.CHECKPOINT else None
            staged = staged_copy(checkpoint_folder, output_dir)
            pushes.append((staged, folder or Path(checkpoint_folder).name, ("*",), f"{message}, checkpoint"))
        jobs = []
        for staged, path_in_repo, replaced, commit_message in pushes:
            job = self._hub_api.run_as_future(
                push_folder_to_hub,
                staged,
                self.hub_model_id,
                token=self.args.hub_token,
                commit_message=commit_message,
                revision=self.args.hub_revision,
                path_in_repo=path_in_repo,
                delete_patterns=replaced,
            )
            what = f"{Path(checkpoint_folder).name} to {path_in_repo or 'the root'}"
            job.add_done_callback(functools.partial(_after_push, staged, what))
            jobs.append(job)
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress(jobs)
        else:
            self.push_in_progress.jobs.extend(jobs)

    @functools.cached_property
    def _hub_api(self) -> HfApi:
        """One client for the background uploads: its single worker sends them in order."""
        return HfApi()
