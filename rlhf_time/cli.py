"""The `rlhf-time` command: train | eval | predict | chat | export | score | plot | webui.

Errors in config or data print one line on stderr and exit with code 2 (use --debug for the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rlhf_time.errors import RlhfTimeError, TrainingInterrupted

EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (`predict DIR --input F --output G max_new_tokens=64`).
    if extra and all("=" in item and not item.startswith("-") for item in extra) and hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # Console lines come from the `rlhf_time` logger's own stderr handler (rlhf_time/logs.py), as in the API.
    try:
        return args.handler(args)
    except BrokenPipeError:
        return _closed_pipe()
    except (RlhfTimeError, FileNotFoundError) as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingInterrupted as stop:  # a checkpoint was written; the loop logged where and how to resume
        return stop.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _build_parser() -> argparse.ArgumentParser:
    from rlhf_time.constants import VERSION

    parser = argparse.ArgumentParser(prog="rlhf-time", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"rlhf-time {VERSION}")
    parser.add_argument("--help-config", action=_HelpConfig, nargs=0, help="list every config field: type, default, help")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("--debug", action="store_true", help="show the full traceback on errors")
        sub.set_defaults(handler=handler)
        return sub

    train = command("train", _train, "Train with a YAML config (no config: the quickstart on the embedded tiny model).")
    train.add_argument("config", nargs="?", help="YAML file mirroring TrainingConfig")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. batch_size=4 use_lora=true")
    train.add_argument("--nproc", type=int, default=None, help="launch N processes on this node via torchrun")
    train.add_argument("--help-config", action="store_true", help="list every config field with default and help")

    evaluate = command("eval", _eval, "Evaluate a model on eval_file; prints the metrics as JSON.")
    evaluate.add_argument("config", metavar="CONFIG_YAML", help="YAML config (set model_name to a trained folder)")
    evaluate.add_argument("overrides", nargs="*", default=[], help="key=value overrides")

    predict = command("predict", _predict, "Generate answers for prompts from a file; writes JSONL.")
    predict.add_argument("model", metavar="MODEL_DIR", help="trained model folder (e.g. outputs/<run>/final), adapter folder or 'tiny'")
    predict.add_argument("--input", required=True, help=".txt (one prompt per line) or .jsonl/.json/.csv with a 'prompt' field")
    predict.add_argument("--output", required=True, help="JSONL file to write {prompt, prediction} lines to")
    predict.add_argument("overrides", nargs="*", default=[],
                         help="key=value overrides (max_new_tokens=64 do_sample=true ...)")
    predict.add_argument("--tools", nargs="+", default=None, metavar="SPEC",
                         help="functions the model may call ('tools.py:multiply', 'pkg.mod:search'): each answer is the "
                              "final reply of the tool loop; the trajectories go to the output as 'messages'")

    chat = command("chat", _chat, "Interactive chat with a trained model (empty line or /exit to quit, /reset to clear).")
    chat.add_argument("model", metavar="MODEL_DIR", help="trained model folder, adapter folder or 'tiny'")
    chat.add_argument("overrides", nargs="*", default=[],
                      help="key=value overrides (system_prompt=..., max_new_tokens=...)")
    chat.add_argument("--tools", nargs="+", default=None, metavar="SPEC",
                      help="functions the model may call ('tools.py:multiply'): calls and results are shown and kept")

    export = command("export", _export, "Merge a LoRA adapter into its base model and save a standalone HF model folder.")
    export.add_argument("adapter", help="folder with adapter_config.json (e.g. outputs/<run>/final)")
    export.add_argument("output", help="folder to write the merged model to")
    export.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                        help="dtype of the saved weights (default: the base model's dtype)")
    export.add_argument("--trust-remote-code", action="store_true",
                        help="allow code shipped with the base model or adapter folder to run (never read from the folder)")

    plot = command("plot", _plot, "Draw PNG charts of one run's metrics, or compare several runs.")
    plot.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folder(s) holding metrics.jsonl")
    plot.add_argument("--output", default=None,
                      help="folder for the PNGs (default: RUN_DIR/plots for one run, ./plots for several)")

    score = command("score", _score, "Score prompt/response records or preference pairs with a trained reward model.")
    score.add_argument("model", help="reward model folder")
    score.add_argument("--input", required=True, help=".jsonl/.json/.csv: prompt/response (or messages) records, "
                                                      "or prompt/chosen/rejected pairs")
    score.add_argument("--output", required=True, help="JSONL: each record plus its reward (pairs: chosen_reward, "
                                                       "rejected_reward; the accuracy is printed)")

    webui = command("webui", _webui, "Serve the web UI (train, runs, chat, evaluate/export) in a browser; needs the "
                                     "webui extra.")
    webui.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1; any other "
                                                            "needs --auth)")
    webui.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    webui.add_argument("--output-dir", default="outputs", help="folder of the run folders to list and write "
                                                               "(default outputs)")
    webui.add_argument("--auth", default=None, metavar="USER:PASSWORD", help="ask for this login before the page")
    return parser


class _HelpConfig(argparse.Action):
    """`rlhf-time --help-config`: the configuration reference as plain text (as `train --help-config`), then exit."""

    def __call__(self, parser, namespace, values, option_string=None):
        from rlhf_time.config_docs import render_text

        try:
            print(render_text(), end="", flush=True)
        except BrokenPipeError:
            parser.exit(_closed_pipe())
        parser.exit(0)


# ---------------------------------------------------------------------------------------------- handlers
def _train(args: argparse.Namespace) -> int:
    from rlhf_time.config import TrainingConfig, parse_overrides
    from rlhf_time.config_docs import render_text

    if args.help_config:
        print(render_text(), end="")
        return 0
    if args.config and "=" in args.config and not Path(args.config).exists():
        args.overrides, args.config = [args.config, *args.overrides], None
    if args.nproc is not None and args.nproc < 1:
        raise RlhfTimeError(f"--nproc must be at least 1 (got {args.nproc})")
    if args.nproc and args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _exec_torchrun(args)
    if args.config is None and not any(o.partition("=")[0].strip() == "train_file" for o in args.overrides):
        from rlhf_time.quickstart import run_quickstart

        run_quickstart(args.overrides)  # no YAML and no data of the user's: the documented demo
        return 0
    if args.config is None:  # key=value only, with the user's own data: an ordinary run on the library's defaults
        config = TrainingConfig(**parse_overrides(args.overrides))
    else:
        config = TrainingConfig.from_yaml(args.config, args.overrides)  # bad configs fail before torch is imported
    from rlhf_time.stages.trainers import trainer_for
    from rlhf_time.runtime.run_folder import refuse_occupied_run_folder

    refuse_occupied_run_folder(config)  # an occupied run folder fails before the model loads

    trainer = trainer_for(config)
    results = trainer.train()
    if trainer.dist.is_main:
        print(json.dumps(results, indent=2, ensure_ascii=False, default=str))
    return 0


def _exec_torchrun(args: argparse.Namespace) -> int:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "rlhf_time", "train", *([args.config] if args.config else []), *args.overrides]
    os.execvp(command[0], command)
    return 0  # not reached


def _eval(args: argparse.Namespace) -> int:
    from rlhf_time.config import TrainingConfig
    from rlhf_time.stages.trainers import trainer_for

    config = TrainingConfig.from_yaml(args.config, args.overrides)
    if not config.eval_file and not (config.eval_split and config.train_file):
        raise RlhfTimeError(f"{args.config}: eval needs eval_file (or eval_split of the train_file data set)")
    if config.stage == "rm":  # training may start an RM from an SFT folder; evaluating one scores a random head
        from rlhf_time.models.checks import require_reward_model

        require_reward_model(config.model_name, "model_name", needed_by="eval of stage rm")
    config.eval_file, config.train_file = config.eval_file or config.train_file, None  # eval_split picks the split
    config.use_lora, config.freeze_layers = False, None  # nothing trains; an adapter folder loads as it is
    if config.stage == "dpo" and not config.dpo.ref_model:
        # A trained DPO model is not its own reference: use the model its training started from.
        from rlhf_time.inference import saved_config

        started_from = saved_config(config.model_name).get("model_name")
        if started_from and started_from != config.model_name:
            config.dpo.ref_model = started_from
            print(f"reference model: {started_from} (the model {config.model_name} was trained from)", file=sys.stderr)
    print(json.dumps(trainer_for(config).evaluate(), indent=2))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from rlhf_time.data import read_prompts

    from rlhf_time.inference import InferenceModel

    if _same_file(args.input, args.output):  # opening the output for writing would empty the prompts first
        raise RlhfTimeError(f"--output {args.output} is the input file {args.input}; write the predictions elsewhere")
    if Path(args.output).is_dir():  # before the model loads, not after generating every answer
        raise RlhfTimeError(f"--output {args.output}: is a folder; give the JSONL file to write, e.g. "
                            f"{Path(args.output) / 'predictions.jsonl'}")
    prompts = read_prompts(args.input)
    model = InferenceModel.load(args.model, args.overrides)
    if args.tools:  # the user's own flag: code named in a model folder never runs by itself
        episodes = model.run_tools([[{"role": "user", "content": prompt}] for prompt in prompts], tools=args.tools)
        lines = [{"prompt": prompt, "prediction": episode.final_text.strip(), "messages": episode.messages}
                 for prompt, episode in zip(prompts, episodes)]
    else:
        lines = [{"prompt": prompt, "prediction": answer} for prompt, answer in zip(prompts, model.predict(prompts))]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as handle:
        for line in lines:
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")
    print(f"wrote {len(lines)} predictions to {args.output}", file=sys.stderr)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from rlhf_time.inference import InferenceModel

    model = InferenceModel.load(args.model, args.overrides)
    history: list[dict[str, str]] = []
    print("rlhf-time chat: empty line or /exit quits, /reset clears the conversation", file=sys.stderr)
    while True:
        try:
            line = input("user> ").strip()
        except EOFError:
            break
        if line in ("", "/exit", "/quit"):
            break
        if line == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": line})
        if args.tools:
            episode = model.run_tools([history], tools=args.tools)[0]
            for message in episode.messages[:-1]:  # the calls and their results, then the final reply
                for call in message.get("tool_calls", []):
                    print(f"tool call> {call['function']['name']}({json.dumps(call['function']['arguments'])})")
                if message["role"] == "tool":
                    print(f"tool> {message['content']}")
            history += episode.messages
            reply = episode.final_text.strip()
        else:
            reply = model.chat(history)
            history.append({"role": "assistant", "content": reply})
        print(f"assistant> {reply}", flush=True)
    return 0


def _export(args: argparse.Namespace) -> int:
    from rlhf_time.models.export import merge_adapter

    merge_adapter(args.adapter, args.output, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    print(f"merged model written to {args.output}", file=sys.stderr)
    return 0


def _score(args: argparse.Namespace) -> int:
    from rlhf_time.inference import score_file

    summary = score_file(args.model, args.input, args.output)
    print(json.dumps(summary), file=sys.stderr)
    return 0


def _plot(args: argparse.Namespace) -> int:
    from rlhf_time.plots import plot_runs

    output = args.output or (str(Path(args.runs[0]) / "plots") if len(args.runs) == 1 else "plots")
    if Path(output).exists() and not Path(output).is_dir():
        raise RlhfTimeError(f"--output {output}: is a file; plot writes one PNG per chart into a folder")
    for path in plot_runs(args.runs, output):
        print(path)
    return 0


def _webui(args: argparse.Namespace) -> int:
    from rlhf_time.webui.server import serve

    serve(args.host, args.port, args.output_dir, args.auth)
    return 0


def _same_file(first: str, second: str) -> bool:
    """Whether two paths name one file (other spellings, symbolic or hard links included)."""
    try:
        return os.path.samefile(first, second)
    except OSError:  # one of them does not exist (yet)
        return Path(first).resolve() == Path(second).resolve()


def _closed_pipe() -> int:
    """The reader of our stdout went away (`rlhf-time train --help-config | head`): stop quietly.

    Python would print a BrokenPipeError traceback at exit while flushing stdout; pointing stdout at devnull
    first avoids it (the recipe of the `signal` module's documentation).
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 1


if __name__ == "__main__":
    sys.exit(main())
