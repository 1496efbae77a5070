"""Strict inputs across the public API: one bad input (at least) per public function of `utils`.

Each row calls a function with a plausible mistake and asserts the error type and that the message names
the argument. Rows marked in-place also assert that the model is unchanged after the refusal (state dict
equal, same number of blocks): a refusal happens before anything is changed. A public function added to
`utils` without a row (or a listed reason why it takes no input to get wrong) fails
`test_every_public_function_has_a_row`.

One kind of input is not refused: a learner's answer to an exercise. An exercise check given an answer
of the wrong kind (text for a number, a number for a function) returns a `Feedback` that says what kind
is expected, in every chapter (`test_a_wrong_kind_of_answer_gets_feedback_not_an_error`); its rows
above pass a bad reference argument (the chapter's own measurements) instead, which is refused.
"""

import importlib
import inspect
import pkgutil
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import utils
from utils import (batches as B, bias, book, bypass, bypass_modeling, distill, exercises, explorers, hooks, plots,
                   routing, serving, specialize, speed, training)


@dataclass
class Context:
    model: torch.nn.Module
    tokenizer: object
    batches: list


def context() -> Context:
    from utils.data import calibration_batches
    from utils.models import tiny_model

    model, tokenizer = tiny_model("tiny-llama")
    return Context(model, tokenizer, calibration_batches(tokenizer, "news", n_samples=2, seq_len=16, batch_size=2))


def meta_model():
    from utils.models import build_from_config

    return build_from_config("tiny-llama")  # shapes without values


@dataclass
class Row:
    function: str  # module.name
    call: Callable[[Context], object]
    error: type
    argument: str  # must appear in the message
    inplace: bool = False  # the model must be unchanged after the refusal
    gap: str = ""  # a known gap, not fixed yet: the row is a strict xfail that says what happens today


def _bias_pairs():
    from utils.bias import prompt_pairs

    return prompt_pairs()[:2]


def _router():
    from utils.routing import AttentionRouter

    return AttentionRouter(router_layer=1, profiles=["a", "b"], skip_sets={"a": [], "b": [2]},
                           weight=torch.zeros(2, 64), bias=torch.zeros(2),
                           feature_mean=torch.zeros(64), feature_std=torch.ones(64))


def _example():
    from utils.specialize import Example

    return Example(task="classify", text="hi", label="ham", prompt="Is it spam? hi", answer="ham")


def _with_environment(variables: dict, call: Callable[[], object]):
    from unittest import mock

    with mock.patch.dict("os.environ", variables):
        return call()


NAN = float("nan")

ROWS = [
    # checks
    Row("checks.check_int", lambda c: __import__("utils.checks").checks.check_int("n", 2.0), TypeError, "n"),
    Row("checks.check_positive_int", lambda c: __import__("utils.checks").checks.check_positive_int("n", 0), ValueError, "n"),
    Row("checks.check_optional_int", lambda c: __import__("utils.checks").checks.check_optional_int("n", "3"), TypeError, "n"),
    Row("checks.check_number", lambda c: __import__("utils.checks").checks.check_number("lr", NAN), ValueError, "lr"),
    Row("checks.check_numbers", lambda c: __import__("utils.checks").checks.check_numbers("values", [1.0, NAN]), ValueError, "values[1]"),
    Row("checks.check_bool", lambda c: __import__("utils.checks").checks.check_bool("flag", 1), TypeError, "flag"),
    Row("checks.check_in", lambda c: __import__("utils.checks").checks.check_in("mode", "x", ["a"]), ValueError, "mode"),
    Row("checks.check_str", lambda c: __import__("utils.checks").checks.check_str("name", 3), TypeError, "name"),
    Row("checks.check_indices", lambda c: __import__("utils.checks").checks.check_indices("layers", "12", 4), TypeError, "layers"),
    Row("checks.check_tensor", lambda c: __import__("utils.checks").checks.check_tensor("x", [1]), TypeError, "x"),
    Row("checks.check_finite", lambda c: __import__("utils.checks").checks.check_finite("scores", torch.tensor([NAN])), ValueError, "scores"),
    Row("checks.check_token_ids", lambda c: __import__("utils.checks").checks.check_token_ids("ids", torch.tensor([400]), 320), ValueError, "ids"),
    Row("checks.check_module", lambda c: __import__("utils.checks").checks.check_module("model", meta_model()), ValueError, "model"),
    Row("checks.check_callable", lambda c: __import__("utils.checks").checks.check_callable("loss_fn", "loss"), TypeError, "loss_fn"),
    Row("checks.check_folder", lambda c: __import__("utils.checks").checks.check_folder("folder", "/proc/rearch-missing"), FileNotFoundError, "folder"),
    Row("checks.model_vocab_size", lambda c: __import__("utils.checks").checks.model_vocab_size("not a model"), TypeError, "model"),
    # models
    Row("models.cache_root", lambda c: __import__("utils.models").models.cache_root(3), TypeError, "cache_dir"),
    Row("models.file_checksums", lambda c: __import__("utils.models").models.file_checksums("/proc/rearch-missing"), FileNotFoundError, "folder"),
    Row("models.cache_problems", lambda c: __import__("utils.models").models.cache_problems(3), TypeError, "folder"),
    Row("models.verified_cache", lambda c: __import__("utils.models").models.verified_cache("/tmp/x", "not callable"), TypeError, "write"),
    Row("models.gguf_writer", lambda c: __import__("utils.models").models.gguf_writer("model.safetensors"), ValueError, "gguf"),
    Row("models.gguf_cache_name", lambda c: __import__("utils.models").models.gguf_cache_name("/no/such.gguf"), FileNotFoundError, "gguf"),
    Row("models.ensure_gguf_cache", lambda c: __import__("utils.models").models.ensure_gguf_cache("weights.bin"), ValueError, "gguf"),
    Row("models.ensure_embedded_cache", lambda c: __import__("utils.models").models.ensure_embedded_cache(verbose="yes"), TypeError, "verbose"),
    Row("models.default_device_and_dtype", lambda c: __import__("utils.models").models.default_device_and_dtype("cpu", "half"), ValueError, "dtype"),
    Row("models.load_model", lambda c: __import__("utils.models").models.load_model("tiny-llama", seed=1.5), TypeError, "seed"),
    Row("models.cache_argument_name", lambda c: __import__("utils.models").models.cache_argument_name("model"), TypeError, "model"),
    Row("models.output_cache", lambda c: __import__("utils.models").models.output_cache(None), TypeError, "output"),
    Row("models.build_config", lambda c: __import__("utils.models").models.build_config({"hidden_size": 4}), ValueError, "model_type"),
    Row("models.build_from_config", lambda c: __import__("utils.models").models.build_from_config("llama-99b"), ValueError, "architecture"),
    Row("models.tiny_tokenizer", lambda c: __import__("utils.models").models.tiny_tokenizer(add_bos="yes"), TypeError, "add_bos"),
    Row("models.tiny_model", lambda c: __import__("utils.models").models.tiny_model("tiny-llama", seed="0"), TypeError, "seed"),
    Row("models.decoder_layers", lambda c: __import__("utils.models").models.decoder_layers(torch.nn.Linear(2, 2)), ValueError, "decoder blocks"),
    Row("models.layer_count", lambda c: __import__("utils.models").models.layer_count(2.0), ValueError, "number of layers"),
    Row("models.glu_projections", lambda c: __import__("utils.models").models.glu_projections(torch.nn.Linear(2, 2)), ValueError, "mlp"),
    Row("models.stack_configs", lambda c: __import__("utils.models").models.stack_configs(c.model, "4"), TypeError, "n_layers"),
    Row("models.model_device", lambda c: __import__("utils.models").models.model_device(torch.nn.ReLU()), ValueError, "model"),
    Row("models.cpu_autocast_dtype", lambda c: __import__("utils.models").models.cpu_autocast_dtype("model"), TypeError, "model"),
    Row("models.compute_autocast", lambda c: _with_environment({"REARCH_CPU_AUTOCAST": "fp8"}, lambda: __import__("utils.models").models.compute_autocast(c.model)), ValueError, "REARCH_CPU_AUTOCAST"),
    Row("models.compute_precision", lambda c: _with_environment({"REARCH_CPU_AUTOCAST": "yes"}, __import__("utils.models").models.compute_precision), ValueError, "REARCH_CPU_AUTOCAST"),
    Row("models.check_layer_indices", lambda c: __import__("utils.models").models.check_layer_indices(c.model, "12"), TypeError, "indices"),
    Row("models.architecture_summary", lambda c: __import__("utils.models").models.architecture_summary("llama"), TypeError, "config"),
    # data
    Row("data.gensim_data_file", lambda c: __import__("utils.data").data.gensim_data_file(3), TypeError, "name"),
    Row("data.atomic_write_text", lambda c: __import__("utils.data").data.atomic_write_text("/tmp/x.txt", 3), TypeError, "text"),
    Row("data.normalized_text", lambda c: __import__("utils.data").data.normalized_text(None), TypeError, "text"),
    Row("data.split_of", lambda c: __import__("utils.data").data.split_of(b"bytes"), TypeError, "text"),
    Row("data.load_corpus", lambda c: __import__("utils.data").data.load_corpus("news", "test"), ValueError, "split"),
    Row("data.load_labeled", lambda c: __import__("utils.data").data.load_labeled("books"), ValueError, "corpus"),
    Row("data.bos_ids", lambda c: __import__("utils.data").data.bos_ids("tokenizer"), TypeError, "tokenizer"),
    Row("data.token_ids", lambda c: __import__("utils.data").data.token_ids(c.tokenizer, "news", max_tokens=-5), ValueError, "max_tokens"),
    Row("data.calibration_batches", lambda c: __import__("utils.data").data.calibration_batches(c.tokenizer, "news", seq_len=16.5), TypeError, "seq_len"),
    # evaluation
    Row("evaluation.batch_nll", lambda c: __import__("utils.evaluation").evaluation.batch_nll(c.model, torch.tensor([[1, 999]])), ValueError, "input_ids"),
    Row("evaluation.perplexity", lambda c: __import__("utils.evaluation").evaluation.perplexity(c.model, torch.arange(10), window=1), ValueError, "window"),
    Row("evaluation.generate", lambda c: __import__("utils.evaluation").evaluation.generate(c.model, c.tokenizer, "hi", max_new_tokens=0), ValueError, "max_new_tokens"),
    Row("evaluation.component_of", lambda c: __import__("utils.evaluation").evaluation.component_of(None), TypeError, "name"),
    Row("evaluation.count_parameters", lambda c: __import__("utils.evaluation").evaluation.count_parameters("model"), TypeError, "model"),
    Row("evaluation.model_size_bytes", lambda c: __import__("utils.evaluation").evaluation.model_size_bytes("model"), TypeError, "model"),
    Row("evaluation.write_lm_eval_tasks", lambda c: __import__("utils.evaluation").evaluation.write_lm_eval_tasks(analogy_items=0), ValueError, "analogy_items"),
    Row("evaluation.run_lm_eval", lambda c: __import__("utils.evaluation").evaluation.run_lm_eval(c.model, c.tokenizer, tasks=("mmlu",)), ValueError, "tasks"),
    Row("evaluation.cached_lm_eval", lambda c: __import__("utils.evaluation").evaluation.cached_lm_eval(c.model, c.tokenizer, limit=0), ValueError, "limit"),
    # depth
    Row("depth.remove_layers", lambda c: __import__("utils.depth").depth.remove_layers(c.model, "12", inplace=True), TypeError, "indices", True),
    Row("depth.layers_removed", lambda c: __import__("utils.depth").depth.layers_removed(c.model, [1.0]).__enter__(), TypeError, "indices", True),
    Row("depth.removable_layers", lambda c: __import__("utils.depth").depth.removable_layers(4, 2, protect_first=True), TypeError, "protect_first"),
    Row("depth.select_last", lambda c: __import__("utils.depth").depth.select_last(c.model, 1.5), TypeError, "n"),
    Row("depth.select_first", lambda c: __import__("utils.depth").depth.select_first(c.model, -1), ValueError, "n"),
    Row("depth.select_window", lambda c: __import__("utils.depth").depth.select_window(c.model, "1", 2), TypeError, "start"),
    Row("depth.select_by_importance", lambda c: __import__("utils.depth").depth.select_by_importance(torch.tensor([NAN, 1.0, 2.0, 3.0]), 1), ValueError, "scores"),
    # width
    Row("width.static_neuron_importance", lambda c: __import__("utils.width").width.static_neuron_importance(c.model, "biggest"), ValueError, "method"),
    Row("width.activation_statistics", lambda c: __import__("utils.width").width.activation_statistics(c.model, c.batches, gram="yes"), TypeError, "gram"),
    Row("width.activation_neuron_importance", lambda c: __import__("utils.width").width.activation_neuron_importance(c.model, c.batches, method="x"), ValueError, "method"),
    Row("width.target_intermediate_size", lambda c: __import__("utils.width").width.target_intermediate_size(128, 64, percent=10, multiple=256), ValueError, "multiple"),
    Row("models.last_logits_only", lambda c: __import__("utils.models").models.last_logits_only("not a model"), TypeError, "model"),
    Row("width.merged_statistics", lambda c: __import__("utils.width").width.merged_statistics({"mean": torch.zeros(2, 3), "mean_abs": torch.zeros(2, 3), "mean_square": torch.zeros(2, 3), "tokens": 4}, {"mean": torch.zeros(2, 5), "mean_abs": torch.zeros(2, 5), "mean_square": torch.zeros(2, 5), "tokens": 4}), ValueError, "same model"),
    Row("width.prune_glu_width_in_steps", lambda c: __import__("utils.width").width.prune_glu_width_in_steps(c.model, c.batches, c.batches[:1], percent=20, rounds=2, heal_steps=2), ValueError, "heal_batches"),
    Row("width.neurons_to_keep", lambda c: __import__("utils.width").width.neurons_to_keep(torch.full((4, 128), NAN), 64), ValueError, "scores"),
    Row("width.prune_glu_width", lambda c: __import__("utils.width").width.prune_glu_width(c.model, torch.full((4, 128), NAN), percent=50), ValueError, "scores", True),
    Row("width.refit_down_proj", lambda c: __import__("utils.width").width.refit_down_proj(c.model, torch.zeros(4, 128, 128), [torch.arange(64)] * 4, [torch.zeros(64, 128)] * 4, ridge=-1.0), ValueError, "ridge", True),
    # importance
    Row("importance.layer_importance", lambda c: __import__("utils.importance").importance.layer_importance(meta_model(), c.batches), ValueError, "model"),
    Row("importance.block_influence", lambda c: __import__("utils.importance").importance.block_influence(c.model, []), ValueError, "batches"),
    Row("importance.angular_distance", lambda c: __import__("utils.importance").importance.angular_distance(c.model, c.batches, 0), ValueError, "n"),
    Row("importance.angular_distances", lambda c: __import__("utils.importance").importance.angular_distances(c.model, c.batches, [0]), ValueError, "sizes"),
    Row("importance.weight_magnitude_importance", lambda c: __import__("utils.importance").importance.weight_magnitude_importance(meta_model()), ValueError, "model"),
    Row("importance.position_importance", lambda c: __import__("utils.importance").importance.position_importance(True), ValueError, "number of layers"),
    Row("importance.calibration_loss", lambda c: __import__("utils.importance").importance.calibration_loss(c.model, "batches"), ValueError, "batches"),
    Row("importance.iterative_loss_pruning", lambda c: __import__("utils.importance").importance.iterative_loss_pruning(c.model, c.batches, 1.0), TypeError, "n"),
    Row("importance.greedy_loss_search", lambda c: __import__("utils.importance").importance.greedy_loss_search(c.model, c.batches, "12", 1, trial=None), TypeError, "candidates"),
    Row("importance.sublayer_importance", lambda c: __import__("utils.importance").importance.sublayer_importance(meta_model(), c.batches), ValueError, "model"),
    # batches
    Row("batches.check_batches", lambda c: B.check_batches({"input_ids": torch.ones(1, 2)}), ValueError, "batches"),
    Row("batches.real_token_mask", lambda c: B.real_token_mask("batch"), TypeError, "batch"),
    Row("batches.to_device", lambda c: B.to_device([1, 2], "cpu"), TypeError, "batch"),
    Row("batches.ids_and_masks", lambda c: B.ids_and_masks([], "cpu"), ValueError, "batches"),
    Row("batches.token_counts", lambda c: B.token_counts(None), TypeError, "batch"),
    Row("batches.batch_stream", lambda c: next(B.batch_stream(c.batches, seed=0.5)), TypeError, "seed"),
    Row("batches.check_disjoint", lambda c: B.check_disjoint(c.batches, c.batches), ValueError, "eval"),
    Row("batches.pad_token_id", lambda c: B.pad_token_id("tokenizer"), TypeError, "tokenizer"),
    Row("batches.pad_rows", lambda c: B.pad_rows([[1, 2]], 0, side="middle"), ValueError, "side"),
    Row("batches.evaluating", lambda c: B.evaluating("model").__enter__(), TypeError, "model"),
    # bias
    Row("bias.check_attributes", lambda c: bias.check_attributes(["height"]), ValueError, "attribute"),
    Row("bias.prompt_pairs", lambda c: bias.prompt_pairs(split="test"), ValueError, "split"),
    Row("bias.check_equal_lengths", lambda c: bias.check_equal_lengths(c.tokenizer, "pairs"), TypeError, "pairs"),
    Row("bias.same_length_pairs", lambda c: bias.same_length_pairs(c.tokenizer, "pairs"), TypeError, "pairs"),
    Row("bias.continuation_logprobs", lambda c: bias.continuation_logprobs(c.model, c.tokenizer, ["a"], ["b", "c"]), ValueError, "continuations"),
    Row("bias.stereotype_gaps", lambda c: bias.stereotype_gaps(c.model, c.tokenizer, _bias_pairs(), batch_size=0), ValueError, "batch_size"),
    Row("bias.bias_from_gaps", lambda c: bias.bias_from_gaps(torch.tensor([NAN, 1.0])), ValueError, "gaps"),
    Row("bias.stereotype_bias", lambda c: bias.stereotype_bias(c.model, c.tokenizer, [], batch_size=4), ValueError, "pairs"),
    Row("bias.pair_activations", lambda c: bias.pair_activations(c.model, c.tokenizer, _bias_pairs(), pooling="max"), ValueError, "pooling"),
    Row("bias.neuron_bias_scores", lambda c: bias.neuron_bias_scores(torch.full((2, 2, 4, 8), NAN)), ValueError, "activations"),
    Row("bias.token_differences", lambda c: bias.token_differences(c.model, c.tokenizer, _bias_pairs()[0], layers="12"), TypeError, "layers"),
    Row("bias.bias_attribution", lambda c: bias.bias_attribution(c.model, c.tokenizer, _bias_pairs(), gated_tokens="some"), ValueError, "gated_tokens"),
    Row("bias.neuron_utility", lambda c: bias.neuron_utility(c.model, []), ValueError, "batches"),
    Row("bias.fair_pruning_scores", lambda c: bias.fair_pruning_scores(torch.full((4, 128), NAN), {}), ValueError, "bias_gain"),
    Row("bias.top_neurons", lambda c: bias.top_neurons(torch.rand(4, 128), 2.5), TypeError, "n"),
    Row("bias.random_neurons", lambda c: bias.random_neurons(4, 128, -1, seed=0), ValueError, "n"),
    Row("bias.neuron_count", lambda c: bias.neuron_count([1, 2]), TypeError, "neurons"),
    Row("bias.scale_neurons_", lambda c: bias.scale_neurons_(c.model, {0: [1, 999]}), ValueError, "neurons", True),
    Row("bias.neurons_scaled", lambda c: bias.neurons_scaled(c.model, {9: [1]}).__enter__(), ValueError, "neurons", True),
    Row("bias.bias_by_attribute", lambda c: bias.bias_by_attribute(torch.zeros(3), _bias_pairs()), ValueError, "gaps"),
    Row("bias.evaluate_pruning", lambda c: bias.evaluate_pruning(c.model, c.tokenizer, {0: [1]}, _bias_pairs(), torch.arange(10), factor=NAN), ValueError, "factor", True),
    # book, exercises, plots
    Row("book.shown", lambda c: book.shown(float("inf")), ValueError, "value"),
    Row("book.glue", lambda c: book.glue("", 1.0), ValueError, "name"),
    Row("exercises.verdict", lambda c: exercises.verdict("yes", "right", "wrong"), TypeError, "correct"),
    Row("exercises.within", lambda c: exercises.within(1.0, 1.0, rel=-0.1), ValueError, "rel"),
    Row("plots.plot_parameter_breakdown", lambda c: plots.plot_parameter_breakdown({}), ValueError, "counts"),
    Row("plots.plot_layer_curves", lambda c: plots.plot_layer_curves({"a": [1.0, NAN]}, "y"), ValueError, "curves"),
    # bypass
    Row("bypass.bypassed_layers", lambda c: bypass.bypassed_layers("model"), TypeError, "model"),
    Row("bypass.bypass_attention", lambda c: bypass.bypass_attention(c.model, [True], inplace=True), TypeError, "indices", True),
    Row("bypass.attention_skipped", lambda c: bypass.attention_skipped(c.model, "12").__enter__(), TypeError, "indices", True),
    Row("bypass.attention_zeroed", lambda c: bypass.attention_zeroed(c.model, [0.5]).__enter__(), TypeError, "indices", True),
    Row("bypass.save_bypassed", lambda c: bypass.save_bypassed(c.model, 3), TypeError, "folder"),
    Row("bypass.load_bypassed", lambda c: bypass.load_bypassed("/proc/rearch-missing"), FileNotFoundError, "folder"),
    Row("bypass.select_attention_by_loss", lambda c: bypass.select_attention_by_loss(c.model, c.batches, 1.5), TypeError, "n"),
    Row("bypass_modeling.attention_only_modules", lambda c: bypass_modeling.attention_only_modules("block"), TypeError, "block"),
    Row("bypass_modeling.AttentionBypassedBlock", lambda c: bypass_modeling.AttentionBypassedBlock(), TypeError, "config"),
    Row("bypass_modeling.bypassed_block_class", lambda c: bypass_modeling.bypassed_block_class("LlamaDecoderLayer"), TypeError, "block_class"),
    Row("bypass_modeling.set_block_class", lambda c: bypass_modeling.set_block_class(c.model.model.layers[0], int), TypeError, "block_class", True),
    Row("bypass_modeling.is_bypassed", lambda c: bypass_modeling.is_bypassed("block"), TypeError, "block"),
    Row("bypass_modeling.attention_types", lambda c: bypass_modeling.attention_types(c.model.config, 0), ValueError, "n_layers"),
    Row("bypass_modeling.cache_slots", lambda c: bypass_modeling.cache_slots(["full_attention"] * 2, {5}), ValueError, "bypassed"),
    Row("bypass_modeling.apply_bypass", lambda c: bypass_modeling.apply_bypass(c.model, [9]), ValueError, "indices", True),
    Row("bypass_modeling.bypassed_model_class", lambda c: bypass_modeling.bypassed_model_class("LlamaForCausalLM"), TypeError, "model_class"),
    Row("bypass_modeling.AttentionBypassedForCausalLM", lambda c: bypass_modeling.AttentionBypassedForCausalLM(), TypeError, "config"),
    # distill
    Row("distill.check_same_vocabulary", lambda c: distill.check_same_vocabulary(320, 400), ValueError, "vocabulary"),
    Row("distill.next_token_loss", lambda c: distill.next_token_loss(torch.zeros(1, 4, 8), torch.zeros(1, 5, dtype=torch.long)), ValueError, "labels"),
    Row("distill.kd_loss", lambda c: distill.kd_loss(torch.zeros(1, 4, 8), torch.zeros(1, 4, 8), temperature=0.0), ValueError, "temperature"),
    Row("distill.check_layer_map", lambda c: distill.check_layer_map({3: 3}, 3, 5), ValueError, "student"),
    Row("distill.hidden_state_loss", lambda c: distill.hidden_state_loss([torch.zeros(1, 2, 4)], [torch.zeros(1, 2, 4)], {0: 5}), ValueError, "teacher"),
    Row("distill.distillation_loss", lambda c: distill.distillation_loss(torch.zeros(1, 4, 8), torch.zeros(1, 4, 8), torch.zeros(1, 4, dtype=torch.long), ce_weight=-1.0), ValueError, "ce_weight"),
    Row("distill.default_layer_map", lambda c: distill.default_layer_map("12", 4), TypeError, "student_layers"),
    Row("distill.distillation_metrics", lambda c: distill.distillation_metrics(c.model, c.model, [], temperature=2.0), ValueError, "batches"),
    Row("distill.distill", lambda c: distill.distill(c.model, c.model, c.batches, steps=0), ValueError, "steps", True),
    Row("distill.logits_from_final_state", lambda c: distill.logits_from_final_state(c.model, torch.zeros(1, 4, dtype=torch.long)), ValueError, "final_state"),
    Row("distill.train_only_blocks_from", lambda c: distill.train_only_blocks_from(c.model, 9), ValueError, "first_block", True),
    # hooks
    Row("hooks.capture_activations", lambda c: hooks.capture_activations(c.model, layers="12").__enter__(), TypeError, "layers"),
    Row("hooks.count_hooks", lambda c: hooks.count_hooks("model"), TypeError, "model"),
    Row("hooks.block_input_replaced", lambda c: hooks.block_input_replaced(c.model, 0, "recorded").__enter__(), TypeError, "inputs"),
    # routing
    Row("routing.AttentionRouter", lambda c: routing.AttentionRouter(1, ["a"], {"a": [2]}, torch.full((1, 64), NAN), torch.zeros(1), torch.zeros(64), torch.ones(64)), ValueError, "weight"),
    Row("routing.skip_candidates", lambda c: routing.skip_candidates(c.model, 7), ValueError, "router_layer"),
    Row("routing.check_router", lambda c: routing.check_router(c.model, "router"), TypeError, "router"),
    Row("routing.AdaptiveBypass", lambda c: routing.AdaptiveBypass(c.model, "router"), TypeError, "router"),
    Row("routing.make_adaptive", lambda c: routing.make_adaptive(c.model, "router"), TypeError, "router", True),
    Row("routing.remove_adaptive", lambda c: routing.remove_adaptive("model"), TypeError, "model"),
    Row("routing.adaptive_state", lambda c: routing.adaptive_state(c.model), ValueError, "model"),
    Row("routing.save_adaptive", lambda c: routing.save_adaptive(c.model, "/tmp/never-written"), ValueError, "model"),
    Row("routing.load_adaptive", lambda c: routing.load_adaptive("/proc/rearch-missing"), FileNotFoundError, "folder"),
    Row("routing.profile_skip_orders", lambda c: routing.profile_skip_orders({"a": torch.tensor([NAN, 1.0, 1.0, 1.0])}, [2, 3]), ValueError, "importance"),
    Row("routing.skip_loss_curve", lambda c: routing.skip_loss_curve(c.model, c.batches, [2, 3], max_skips=5), ValueError, "max_skips"),
    Row("routing.allocate_skips", lambda c: routing.allocate_skips({"a": torch.tensor([1.0, 2.0])}, budget=NAN, input_shares={"a": 1.0}), ValueError, "budget"),
    Row("routing.pooled_hidden_states", lambda c: routing.pooled_hidden_states(c.model, c.batches, router_layer=9), ValueError, "router_layer"),
    Row("routing.fit_router", lambda c: routing.fit_router({"a": torch.full((2, 64), NAN), "b": torch.zeros(2, 64)}, 1, {"a": [], "b": [2]}), ValueError, "features"),
    Row("routing.skipped_count", lambda c: routing.skipped_count("model"), TypeError, "model"),
    Row("routing.per_input_nll", lambda c: routing.per_input_nll(c.model, [torch.tensor([1, 999])]), ValueError, "input"),
    Row("routing.perplexity_by_kind", lambda c: routing.perplexity_by_kind({}), ValueError, "scored"),
    # specialize
    Row("specialize.sms_fields", lambda c: specialize.sms_fields("hi", "maybe"), ValueError, "label"),
    Row("specialize.shorten", lambda c: specialize.shorten("hello", 0), ValueError, "max_chars"),
    Row("specialize.make_examples", lambda c: specialize.make_examples([("hi", "ham")], "translate"), ValueError, "task"),
    Row("specialize.sms_examples", lambda c: specialize.sms_examples("train", "classify", n_per_class=-1), ValueError, "n_per_class"),
    Row("specialize.prompt_token_ids", lambda c: specialize.prompt_token_ids(c.tokenizer, 3), TypeError, "prompt"),
    Row("specialize.answer_token_ids", lambda c: specialize.answer_token_ids(c.tokenizer, None), TypeError, "answer"),
    Row("specialize.position_ids_from_mask", lambda c: specialize.position_ids_from_mask(torch.ones(4)), ValueError, "attention_mask"),
    Row("specialize.training_batches", lambda c: specialize.training_batches(c.tokenizer, [_example()], batch_size=0), ValueError, "batch_size"),
    Row("specialize.answer_loss", lambda c: specialize.answer_loss(c.model, c.batches[0], anchor_weight=-1.0), ValueError, "anchor_weight"),
    Row("distill.check_head_once", lambda c: __import__("utils.distill").distill.check_head_once(c.model, torch.zeros(1, 2, c.model.config.hidden_size), torch.ones(1, 2, c.model.config.vocab_size), {}, "my_cache"), ValueError, "my_cache"),
    Row("specialize.anchor_reference", lambda c: specialize.anchor_reference(c.model, c.batches[0], {}, 4), ValueError, "peft"),
    Row("specialize.finetune", lambda c: specialize.finetune(c.model, c.batches, steps=1, anchor_weight=1.0, reference_cache=[]), TypeError, "reference_cache", True),
    Row("evaluation.model_fingerprint", lambda c: __import__("utils.evaluation").evaluation.model_fingerprint(c.model, include_trainable="no"), TypeError, "include_trainable"),
    Row("batches.batch_key", lambda c: __import__("utils.batches").batches.batch_key({"ids": 1}), KeyError, "input_ids"),
    Row("specialize.linear_module_names", lambda c: specialize.linear_module_names("model"), TypeError, "model"),
    Row("specialize.lora_config", lambda c: specialize.lora_config(c.model, rank=0), ValueError, "rank"),
    Row("specialize.adapter_size_bytes", lambda c: specialize.adapter_size_bytes(c.model, "/proc/rearch-missing"), FileNotFoundError, "folder"),
    Row("specialize.finetune", lambda c: specialize.finetune(c.model, c.batches, steps=-1), ValueError, "steps", True),
    Row("specialize.answer_logprobs", lambda c: specialize.answer_logprobs(c.model, c.tokenizer, ["hi"], answers=()), ValueError, "answers"),
    Row("specialize.classify", lambda c: specialize.classify(c.model, c.tokenizer, ["hi"], batch_size=0), ValueError, "batch_size"),
    Row("specialize.classification_scores", lambda c: specialize.classification_scores(["ham"], []), ValueError, "examples"),
    Row("specialize.generate_answers", lambda c: specialize.generate_answers(c.model, c.tokenizer, ["hi"], max_new_tokens=0), ValueError, "max_new_tokens"),
    Row("specialize.check_extraction", lambda c: specialize.check_extraction(None, {}), TypeError, "output"),
    Row("specialize.extraction_scores", lambda c: specialize.extraction_scores(["a", "b"], [_example()]), ValueError, "examples"),
    Row("specialize.specialist_report", lambda c: specialize.specialist_report(c.model, c.tokenizer, [], [], torch.arange(10), window=1), ValueError, "window"),
    # speed
    Row("speed.synchronize", lambda c: speed.synchronize(3.5), TypeError, "device"),
    Row("speed.interleaved_samples", lambda c: speed.interleaved_samples({"a": lambda: None}, repeats=0), ValueError, "repeats"),
    Row("speed.interleaved_timings", lambda c: speed.interleaved_timings({"a": lambda: None}, warmup=-1), ValueError, "warmup"),
    Row("speed.greedy_tokens", lambda c: speed.greedy_tokens(c.model, torch.tensor([[1, 2]]), new_tokens=0), ValueError, "new_tokens"),
    Row("speed.measure_speed", lambda c: speed.measure_speed(c.model, prompt_tokens=0), ValueError, "prompt_tokens"),
    Row("speed.measure_speed_rounds", lambda c: speed.measure_speed_rounds({"a": c.model}, rounds=0), ValueError, "rounds"),
    Row("speed.median_over_rounds", lambda c: speed.median_over_rounds({"a": [{"ttft_ms": 1.0}]}), ValueError, "decode_tokens_per_s"),
    Row("speed.kv_cache_bytes", lambda c: speed.kv_cache_bytes("cache"), TypeError, "cache"),
    Row("speed.filled_cache_layers", lambda c: speed.filled_cache_layers("cache"), TypeError, "cache"),
    Row("speed.kv_cache_bytes_per_token", lambda c: speed.kv_cache_bytes_per_token(c.model, tokens=0), ValueError, "tokens"),
    Row("speed.attention_layer_count", lambda c: speed.attention_layer_count("model"), TypeError, "model"),
    Row("speed.weight_bytes", lambda c: speed.weight_bytes("model"), TypeError, "model"),
    Row("speed.decode_bytes", lambda c: speed.decode_bytes(c.model, context=-1), ValueError, "context"),
    Row("speed.matmul_parameters", lambda c: speed.matmul_parameters("model"), TypeError, "model"),
    Row("speed.prefill_flops", lambda c: speed.prefill_flops(c.model, tokens=2.5), TypeError, "tokens"),
    # training
    Row("training.check_training_arguments", lambda c: training.check_training_arguments(steps=10, lr=NAN), ValueError, "lr"),
    Row("training.autocast_dtype", lambda c: training.autocast_dtype(c.model, "fp8"), ValueError, "mixed_precision"),
    Row("training.evaluation_values", lambda c: training.evaluation_values("low"), TypeError, "value"),
    Row("training.train", lambda c: training.train(c.model, c.batches, lambda m, b: None, steps=True, lr=1e-3), TypeError, "steps", True),
    # book (new)
    Row("book.budget_tier", lambda c: _with_environment({"REARCH_BUDGET": "huge"}, book.budget_tier), ValueError, "REARCH_BUDGET"),
    Row("book.recorded_time", lambda c: book.recorded_time("ch02", "tpu", None), ValueError, "kind"),
    Row("book.recorded_runs", lambda c: book.recorded_runs("tpu", None), ValueError, "kind"),
    Row("book.recorded_glued", lambda c: book.recorded_glued("ch02", "cpu", None, {}), ValueError, "where"),
    Row("book.describe_run", lambda c: book.describe_run({"machine": "x", "seconds": 60}, "tpu"), ValueError, "kind"),
    Row("book.book_log_times", lambda c: book.book_log_times(b"log"), TypeError, "log"),
    Row("book.build_environment", lambda c: book.build_environment("/nonexistent-course-folder"), FileNotFoundError, "root"),
    # bypass_modeling (new)
    Row("bypass_modeling.check_attention_remains", lambda c: bypass_modeling.check_attention_remains(["full_attention"] * 2, {0, 1}), ValueError, "attention sublayer"),
    Row("bypass_modeling.statically_bypassed", lambda c: bypass_modeling.statically_bypassed("blocks"), TypeError, "blocks"),
    # depth (new)
    Row("depth.kl_swap_search", lambda c: __import__("utils.depth").depth.kl_swap_search(c.model, c.batches, [1], radius=-1, progress=False), ValueError, "radius", True),
    Row("depth.reference_log_probs", lambda c: __import__("utils.depth").depth.reference_log_probs(c.model, []), ValueError, "batches"),
    Row("depth.removal_kl", lambda c: __import__("utils.depth").depth.removal_kl(c.model, c.batches, [], [1]), ValueError, "reference", True),
    Row("depth.replace_span", lambda c: __import__("utils.depth").depth.replace_span(c.model, 1, 0, c.batches, progress=False), ValueError, "n", True),
    Row("depth.select_window_by_distance", lambda c: __import__("utils.depth").depth.select_window_by_distance([NAN, 1.0, 2.0, 3.0], 1), ValueError, "distances"),
    # distill (new)
    Row("distill.cut_layer_map", lambda c: distill.cut_layer_map([9], 4), ValueError, "removed"),
    # evaluation (new)
    Row("evaluation.cached_perplexity", lambda c: __import__("utils.evaluation").evaluation.cached_perplexity(c.model, torch.arange(10), window=1, progress=False), ValueError, "window"),
    Row("evaluation.model_fingerprint", lambda c: __import__("utils.evaluation").evaluation.model_fingerprint("model"), TypeError, "model"),
    # exercises (new)
    Row("exercises.check_ch02_ideal_speedup", lambda c: exercises.check_ch02_ideal_speedup(1.5, 4, 5), ValueError, "n_removed"),
    Row("exercises.check_ch02_params_saved", lambda c: exercises.check_ch02_params_saved(10.0, -1, 100, 1000), ValueError, "blocks_removed"),
    Row("exercises.check_ch03_glu_parameters", lambda c: exercises.check_ch03_glu_parameters(1.0, 0, 128), ValueError, "hidden_size"),
    Row("exercises.check_ch03_kv_bytes_per_token", lambda c: exercises.check_ch03_kv_bytes_per_token(1.0, 4, 0, 16, 4), ValueError, "n_kv_heads"),
    Row("exercises.check_ch03_least_changed_block", lambda c: exercises.check_ch03_least_changed_block(0, []), ValueError, "mean_cosine"),
    Row("exercises.check_ch04_angular_window", lambda c: exercises.check_ch04_angular_window([1, 2], [0.1, 0.2, 0.3], 0), ValueError, "n"),
    Row("exercises.check_ch04_select_lowest", lambda c: exercises.check_ch04_select_lowest(lambda s, n: [], [1.0, 2.0], 5), ValueError, "`n`"),
    Row("exercises.check_ch05_kept_width", lambda c: exercises.check_ch05_kept_width(1.0, 128, 150.0, 8), ValueError, "percent"),
    Row("exercises.check_ch05_peak_to_peak", lambda c: exercises.check_ch05_peak_to_peak(lambda g, u: g, torch.zeros(2, 2), torch.zeros(3, 2)), ValueError, "gate"),
    Row("exercises.check_ch05_removed_parameters", lambda c: exercises.check_ch05_removed_parameters(1.0, 64, 128, 256, 4), ValueError, "keep"),
    Row("exercises.check_ch06_adapter_megabytes", lambda c: exercises.check_ch06_adapter_megabytes(1.0, -5, 1.0), ValueError, "trainable"),
    Row("exercises.check_ch06_lora_parameters", lambda c: exercises.check_ch06_lora_parameters(1, 64, 64, 0, 128), ValueError, "rank"),
    Row("exercises.check_ch06_rank_ratio", lambda c: exercises.check_ch06_rank_ratio(2.0, 100.0, 200.0, 8, 4), ValueError, "high"),
    Row("exercises.check_ch07_better_method", lambda c: exercises.check_ch07_better_method("x", {}), ValueError, "ratios"),
    Row("exercises.check_ch07_kv_bytes", lambda c: exercises.check_ch07_kv_bytes(1.0, 100.0, 50.0, 4, 5), ValueError, "bypassed"),
    Row("exercises.check_ch07_kv_limit", lambda c: exercises.check_ch07_kv_limit(1.0, 4, 4), ValueError, "bypassed"),
    Row("exercises.check_ch07_lowest_k", lambda c: exercises.check_ch07_lowest_k(lambda s, k: [], [1.0, 2.0], 5), ValueError, "k"),
    Row("exercises.check_ch08a_allocation", lambda c: exercises.check_ch08a_allocation(lambda c, b, w: {}, {"a": [0.0, 1.0]}, -1, {"a": 1.0}), ValueError, "budget"),
    Row("exercises.check_ch08a_batch_skips", lambda c: exercises.check_ch08a_batch_skips(1, {}, 0), ValueError, "skip_sets"),
    Row("exercises.check_ch08a_more_skips", lambda c: exercises.check_ch08a_more_skips("a", {}), ValueError, "allocation"),
    Row("exercises.check_ch08b_bias_metric", lambda c: exercises.check_ch08b_bias_metric(lambda g: 0.0, torch.zeros(3), 0.0), ValueError, "gaps"),
    Row("exercises.check_ch08b_budget_choice", lambda c: exercises.check_ch08b_budget_choice(0, [0, 4], [1.0], [1.0, 1.0], 1.1), ValueError, "bias_ratio"),
    Row("exercises.check_ch08b_random_change", lambda c: exercises.check_ch08b_random_change(1.0, NAN, 0.0), ValueError, "measured_change"),
    # explorers
    Row("explorers.check_results", lambda c: explorers.check_results({}, "x", ["y"]), ValueError, "results"),
    Row("explorers.explore", lambda c: explorers.explore({"m": {"x": [1.0, 2.0], "y": [1.0, 2.0]}}, "x", "z", interactive=False), ValueError, "y"),
    Row("explorers.explorer_widget", lambda c: explorers.explorer_widget("explorer"), TypeError, "explorer"),
    # models (new)
    Row("models.run_for_hooks", lambda c: __import__("utils.models").models.run_for_hooks(c.model, torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 5)), ValueError, "attention_mask"),
    Row("models.saved_folder_kind", lambda c: __import__("utils.models").models.saved_folder_kind("/proc/rearch-missing"), FileNotFoundError, "folder"),
    # serving
    Row("serving.attention_implementation", lambda c: serving.attention_implementation(c.model, "flash9").__enter__(), ValueError, "name", True),
    Row("serving.card_peaks", lambda c: serving.card_peaks(memory_bytes_per_s=-1.0), ValueError, "memory_bytes_per_s"),
    Row("serving.check_step_arguments", lambda c: serving.check_step_arguments(0, 128, "auto", "decode"), ValueError, "batch_size"),
    Row("serving.compile_blocks", lambda c: serving.compile_blocks(c.model, mode="fastest"), ValueError, "mode", True),
    Row("serving.compile_blocks", lambda c: serving.compile_blocks(c.model, scope="layer"), ValueError, "scope", True),
    Row("serving.copy_bandwidth", lambda c: serving.copy_bandwidth("cpu", megabytes=0), ValueError, "megabytes"),
    Row("serving.decode_attention", lambda c: serving.decode_attention(c.model.model.layers[0].self_attn, torch.zeros(1, 4, 1, 16), torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), None, dropout=0.5), ValueError, "dropout"),
    Row("serving.decode_attention_matmul", lambda c: serving.decode_attention_matmul(c.model.model.layers[0].self_attn, torch.zeros(1, 4, 1, 16), torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), None, dropout=0.5), ValueError, "dropout"),
    Row("serving.device_name", lambda c: serving.device_name(3.5), TypeError, "device"),
    Row("serving.filled_static_cache", lambda c: serving.filled_static_cache(c.model, 1, 200, 100), ValueError, "context"),
    Row("serving.prefill_report", lambda c: serving.prefill_report({}, tokens=16), ValueError, "models"),
    Row("serving.python_hooks_suspended", lambda c: serving.python_hooks_suspended("model").__enter__(), TypeError, "model"),
    Row("serving.has_forward_hooks", lambda c: serving.has_forward_hooks("model"), TypeError, "model"),
    Row("serving.register_decode_attention", lambda c: serving.register_decode_attention(matmul="yes"), TypeError, "matmul"),
    Row("serving.relation_to_ideal", lambda c: serving.relation_to_ideal(1.0, 0.0), ValueError, "ideal"),
    Row("serving.running_attention_blocks", lambda c: serving.running_attention_blocks("model"), TypeError, "model"),
    Row("serving.served_decode_report", lambda c: serving.served_decode_report({}), ValueError, "models"),
    Row("serving.served_decode_step", lambda c: serving.served_decode_step(c.model, context=0), ValueError, "context"),
    Row("serving.spread", lambda c: serving.spread([]), ValueError, "values"),
    Row("serving.step_bytes", lambda c: serving.step_bytes(c.model, context=-1), ValueError, "context"),
    # speed (new)
    Row("speed.timed_call", lambda c: speed.timed_call("f"), TypeError, "function"),
    Row("speed.stopwatch", lambda c: speed.stopwatch(3.5), TypeError, "device"),
    # width (new)
    Row("width.literature_neuron_importance", lambda c: __import__("utils.width").width.literature_neuron_importance(c.model, {}, method="x"), ValueError, "method"),
    Row("width.prune_glu_width_with_bias", lambda c: __import__("utils.width").width.prune_glu_width_with_bias(c.model, torch.rand(4, 128), torch.full((4, 128), NAN), percent=50), ValueError, "mean", True),
    Row("width.taylor_neuron_importance", lambda c: __import__("utils.width").width.taylor_neuron_importance(c.model, c.batches, aggregate="max", progress=False), ValueError, "aggregate"),
]


def _public_functions() -> set[str]:
    names = set()
    for info in pkgutil.iter_modules(utils.__path__):
        module = importlib.import_module(f"utils.{info.name}")
        for name, value in vars(module).items():
            if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(value) or inspect.isclass(value) or inspect.isfunction(getattr(value, "__wrapped__", None)):
                names.add(f"{info.name}.{name}")
    return names


# Public names that take no input a caller could get wrong, or records (dataclasses) whose fields are
# checked where they are used. Each with its reason; anything else needs a row.
NO_INPUT = {
    "models.embedded_gguf_path": "no arguments",
    "models.known_model_names": "no arguments",
    "models.library_versions": "no arguments",
    "models.cpu_has_bf16_units": "no arguments",
    "data.analogy_questions": "no arguments",
    "data.CorpusInfo": "a record of constants",
    "bypass.modeling_source": "no arguments",
    "exercises.Feedback": "a record (correct, message)",
    "training.TrainingHistory": "a record filled by train",
    "hooks.Captured": "a record filled by capture_activations",
    "specialize.Example": "a record made by make_examples",
    "bias.PromptPair": "a record made by prompt_pairs",
    "explorers.live_kernel": "no arguments",
    "explorers.Explorer": "a record made by explore (which checks the results with check_results)",
    "exercises.check_ch06_merged_weight": "its one argument is the learner's answer, graded: a non-function gets a Feedback",
    "exercises.check_ch02_recovery": "its one argument is the learner's answer, graded: a non-function gets a Feedback",
    "exercises.check_ch04_block_influence": "its one argument is the learner's answer, graded: a non-function gets a Feedback",
}


# One answer of the wrong kind per exercise check, and the words the feedback must use for what is expected.
WRONG_KIND_ANSWERS = {
    "check_ch02_params_saved": (lambda: exercises.check_ch02_params_saved("ten", 1, 100, 1000), "a number"),
    "check_ch02_ideal_speedup": (lambda: exercises.check_ch02_ideal_speedup([1.2], 30, 6), "a number"),
    "check_ch02_recovery": (lambda: exercises.check_ch02_recovery("not a function"), "a function recovery("),
    "check_ch03_kv_bytes_per_token": (lambda: exercises.check_ch03_kv_bytes_per_token("many", 4, 2, 16, 4), "a number"),
    "check_ch03_glu_parameters": (lambda: exercises.check_ch03_glu_parameters("3 x 64 x 128", 64, 128), "a number"),
    "check_ch03_least_changed_block": (lambda: exercises.check_ch03_least_changed_block("two", [0.1, 0.9]), "a block index"),
    "check_ch04_select_lowest": (lambda: exercises.check_ch04_select_lowest("select", [1.0, 2.0, 3.0], 1), "a function select("),
    "check_ch04_block_influence": (lambda: exercises.check_ch04_block_influence(3), "a function block_influence("),
    "check_ch04_angular_window": (lambda: exercises.check_ch04_angular_window("1, 2", [0.1, 0.2, 0.3], 2), "a list of block indices"),
    "check_ch05_removed_parameters": (lambda: exercises.check_ch05_removed_parameters(True, 64, 128, 96, 4), "a number"),
    "check_ch05_peak_to_peak": (lambda: exercises.check_ch05_peak_to_peak([1, 2], torch.zeros(2, 2), torch.zeros(2, 2)), "a function peak_to_peak("),
    "check_ch05_kept_width": (lambda: exercises.check_ch05_kept_width("about a thousand", 1536, 20, 64), "a number"),
    "check_ch06_lora_parameters": (lambda: exercises.check_ch06_lora_parameters("r(d_in + d_out)", 64, 64, 8, 1024), "a number of parameters"),
    "check_ch06_merged_weight": (lambda: exercises.check_ch06_merged_weight(torch.zeros(2, 2)), "a function merge("),
    "check_ch06_adapter_megabytes": (lambda: exercises.check_ch06_adapter_megabytes("1 MB", 1000, 0.004), "a number of megabytes"),
    "check_ch06_rank_ratio": (lambda: exercises.check_ch06_rank_ratio("4x", 100.0, 400.0, 2, 8), "a number (a ratio)"),
    "check_ch07_kv_bytes": (lambda: exercises.check_ch07_kv_bytes([100], 100.0, 50.0, 4, 2), "a number of bytes"),
    "check_ch07_lowest_k": (lambda: exercises.check_ch07_lowest_k([0, 1], [1.0, 2.0, 3.0], 1), "a function select("),
    "check_ch07_better_method": (lambda: exercises.check_ch07_better_method(1, {"one-shot importance": 1.1, "greedy loss": 1.2}), "one of"),
    "check_ch07_kv_limit": (lambda: exercises.check_ch07_kv_limit("2x", 4, 2), "a number (a ratio)"),
    "check_ch08a_more_skips": (lambda: exercises.check_ch08a_more_skips(["sms"], {"sms": 3, "wikipedia": 1}), "one of"),
    "check_ch08a_allocation": (lambda: exercises.check_ch08a_allocation({"a": 1}, {"a": [0.0, 1.0], "b": [0.0, 1.0]}, 1, {"a": 0.5, "b": 0.5}), "a function allocate("),
    "check_ch08a_batch_skips": (lambda: exercises.check_ch08a_batch_skips("two", {"a": [1, 2], "b": [2]}, 1), "a whole number"),
    "check_ch08b_bias_metric": (lambda: exercises.check_ch08b_bias_metric(0.5, torch.zeros(3, 2), 0.0), "a function metric("),
    "check_ch08b_budget_choice": (lambda: exercises.check_ch08b_budget_choice("ninety-six", [0, 4], [1.0, 0.8], [1.0, 1.01], 1.05), "one of the measured neuron counts"),
    "check_ch08b_random_change": (lambda: exercises.check_ch08b_random_change("about zero", 1.0, -40.0), "a number of percent"),
}


def test_every_exercise_check_has_a_wrong_kind_answer():
    checks = {name for name in vars(exercises) if name.startswith("check_ch")}
    assert checks == set(WRONG_KIND_ANSWERS), sorted(checks ^ set(WRONG_KIND_ANSWERS))


@pytest.mark.parametrize("check", sorted(WRONG_KIND_ANSWERS))
def test_a_wrong_kind_of_answer_gets_feedback_not_an_error(check):
    call, expected = WRONG_KIND_ANSWERS[check]
    feedback = call()  # no exception: the learner's answer is graded
    assert isinstance(feedback, exercises.Feedback) and not feedback.correct, feedback
    assert f"must be {expected}".lower() in feedback.message.lower(), feedback.message


def test_every_public_function_has_a_row():
    covered = {row.function for row in ROWS} | set(NO_INPUT)
    missing = sorted(_public_functions() - covered)
    assert not missing, f"public functions without a bad-input row in tests/test_bad_inputs.py: {missing}"
    assert not covered - _public_functions(), f"rows for names that do not exist: {sorted(covered - _public_functions())}"


@pytest.mark.parametrize("row", [pytest.param(row, marks=pytest.mark.xfail(strict=True, reason=row.gap)) if row.gap
                                 else row for row in ROWS], ids=[row.function for row in ROWS])
def test_bad_input_is_refused_clearly_and_before_anything_changes(row):
    c = context()
    before = {name: tensor.clone() for name, tensor in c.model.state_dict().items()}
    blocks = len(c.model.model.layers)
    with pytest.raises(row.error) as raised:
        row.call(c)
    assert row.argument.lower() in str(raised.value).lower(), f"the message does not name {row.argument!r}: {raised.value}"
    if row.inplace:
        after = c.model.state_dict()
        assert len(c.model.model.layers) == blocks and before.keys() == after.keys()
        assert all(torch.equal(before[name], after[name]) for name in before), "the model changed before the refusal"


@pytest.mark.parametrize("function", ["evaluation.perplexity", "depth.remove_layers", "width.prune_glu_width",
                                      "importance.block_influence", "bypass.bypass_attention"])
def test_a_model_on_the_meta_device_is_refused_by_name(function):
    from utils import bypass, depth, evaluation, importance, width

    c = context()
    model = meta_model()
    calls = {
        "evaluation.perplexity": lambda: evaluation.perplexity(model, torch.arange(10)),
        "depth.remove_layers": lambda: depth.remove_layers(model, [1]),
        "width.prune_glu_width": lambda: width.prune_glu_width(model, torch.rand(4, 128), percent=50),
        "importance.block_influence": lambda: importance.block_influence(model, c.batches),
        "bypass.bypass_attention": lambda: bypass.bypass_attention(model, [1]),
    }
    with pytest.raises(ValueError, match="model is on the 'meta' device"):
        calls[function]()


def test_shape_only_functions_accept_a_model_on_the_meta_device():
    """Chapter 3 counts the parameters and bytes of real architectures built on the meta device."""
    from utils.evaluation import count_parameters, model_size_bytes

    model = meta_model()
    assert count_parameters(model)["total"] > 0
    assert model_size_bytes(model) > 0
