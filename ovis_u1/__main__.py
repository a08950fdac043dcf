"""Command line: `python -m ovis_u1 generate|edit|answer ...`.

    python -m ovis_u1 generate --prompt "a red cube on a table" --num-images 2 --out outputs
    python -m ovis_u1 edit --image photo.png --instruction "make the sky purple"
    python -m ovis_u1 answer --question "What is in the picture?" --image photo.png --stream
    python -m ovis_u1 answer --image scene.png --question "How many circles?" --question "What colour are they?"
    python -m ovis_u1 answer --image scene.png --chat      # one question per line on stdin, until EOF

The model is loaded as the web app loads it (`ovis_u1.checkpoint.load_model`): `--checkpoint` names a
directory or a hub id (`AIDC-AI/Ovis-U1-3B`, fetched with huggingface_hub); without it, $OVIS_U1_CHECKPOINT,
else the shipped default model. `--preset NAME` builds a randomly initialised one instead, for trying the
commands out. Bad input (missing or corrupt image, bad number, missing checkpoint, a hub id that cannot
be fetched) prints one line to stderr and exits with 2.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from .checkpoint import CHECKPOINT_ENV, CheckpointError, checked_device, default_dtype, load_model
from .config import PRESETS
from .generation import MAX_IMAGES_PER_CALL as MAX_IMAGES
from .generation import MODES
from .images import ImageInputError, load_image

EXIT_BAD_INPUT = 2
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UsageError(Exception):
    """Bad input from the command line; reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the usage block too; one line is enough
        raise UsageError(f"{self.prog}: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    model = _Parser(add_help=False)
    g = model.add_argument_group("model")
    g.add_argument("--checkpoint", metavar="DIR|ORG/NAME",
                   help=f"checkpoint directory or hub id (default: ${CHECKPOINT_ENV}, else the shipped model)")
    g.add_argument("--preset", choices=sorted(PRESETS), help="a randomly initialised model of this preset")
    g.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    g.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    g.add_argument("--cpu-offload", action="store_true", help="keep weights in CPU RAM, one group on the GPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the visual decoder")
    g.add_argument("--quiet", action="store_true", help="no progress bar")

    sampling = _Parser(add_help=False)
    g = sampling.add_argument_group("sampling")
    g.add_argument("--steps", type=int, help="denoising steps (default: the model's, fewer in fast mode)")
    g.add_argument("--guidance", type=float, help="text guidance scale")
    g.add_argument("--seed", type=int, default=42, help="image k of the call uses seed + k (default 42)")
    g.add_argument("--num-images", type=int, default=1, help="images per prompt / instruction")
    g.add_argument("--mode", choices=MODES, default="exact", help="exact (default), fast or plain")
    g.add_argument("--out", metavar="DIR", default="outputs", help="folder for the PNGs (default outputs)")

    p = _Parser(prog="python -m ovis_u1", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    gen = sub.add_parser("generate", parents=[model, sampling], help="text to image")
    gen.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    gen.add_argument("--height", type=int)
    gen.add_argument("--width", type=int)
    ed = sub.add_parser("edit", parents=[model, sampling], help="edit an image by instruction")
    ed.add_argument("--image", required=True, metavar="PATH")
    ed.add_argument("--instruction", action="append", required=True, help="repeat for several edits")
    ed.add_argument("--image-guidance", type=float, help="image guidance scale")
    ans = sub.add_parser("answer", parents=[model], help="answer a question, about images or not")
    ans.add_argument("--question", action="append", default=[],
                     help="repeat for a conversation: each is asked with the earlier turns as history")
    ans.add_argument("--chat", action="store_true",
                     help="after any --question, read one question per line from stdin until EOF")
    ans.add_argument("--image", action="append", default=[], metavar="PATH", help="repeat for several images")
    ans.add_argument("--max-new-tokens", type=int)
    ans.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    return p


def model_from_args(args):
    """The model the arguments name: a checkpoint through the shared loader, or a random preset."""
    if args.checkpoint and args.preset:
        raise UsageError("give --checkpoint or --preset, not both")
    device = parse_device(args.device)
    if args.cpu_offload and device.type != "cuda":
        raise UsageError("--cpu-offload needs a CUDA device")
    # Offloading loads into CPU RAM, in the dtype the GPU will run.
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
    load_device = torch.device("cpu") if args.cpu_offload else device
    if args.preset:
        from .model import OvisU1
        model = OvisU1.from_preset(args.preset, device=load_device, dtype=dtype).eval()
    else:
        model = load_model(args.checkpoint, device=load_device, dtype=dtype)
    if args.cpu_offload:
        from .acceleration import enable_cpu_offload
        enable_cpu_offload(model, device)
    if args.compile:
        from .acceleration import compile_decoder
        compile_decoder(model)
    return model


MAX_SEED = 2**63 - 1  # seed + k seeds a torch generator, which takes up to 64 bits


def parse_device(text: str | None) -> torch.device:
    """--device as a torch.device that exists here, or a UsageError saying what is allowed."""
    try:
        return checked_device(text, label="--device")
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_args(args) -> None:
    """What argparse cannot check: text that is valid UTF-8 (an argument's undecodable bytes reach Python as
    lone surrogates), a seed the generators take."""
    for flag in ("prompt", "question", "instruction"):
        for k, value in enumerate(getattr(args, flag, None) or []):
            _utf8(value, f"--{flag} #{k + 1}" if len(getattr(args, flag)) > 1 else f"--{flag}")
    seed = getattr(args, "seed", None)
    if seed is not None and not 0 <= seed <= MAX_SEED - MAX_IMAGES:
        raise UsageError(f"--seed must be an integer in [0, {MAX_SEED - MAX_IMAGES}], got {seed}")


def _utf8(text: str, where: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UsageError(f"{where} holds bytes that are not UTF-8 text (at character {e.start}); pass UTF-8 text") \
            from None
    return text


def read_image(path: str):
    """`load_image` for a path from the command line: a file that cannot be read (no permission, an I/O error
    as /proc/self/mem gives) is a one-line error too."""
    try:
        return load_image(path)
    except OSError as e:
        raise UsageError(f"cannot read image {path!r}: {e.strerror or e}") from None


def save_images(images, out: str, stem: str, seed: int) -> list[Path]:
    folder = Path(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for k, image in enumerate(images):
            path = folder / f"{stem}-seed{seed + k}.png"
            image.save(path)
            paths.append(path)
    except OSError as e:
        raise UsageError(f"cannot write images to {folder}: {e.strerror or e}") from None
    return paths


def run(args) -> None:
    check_args(args)
    if args.command == "edit":
        source = read_image(args.image)  # before the model loads: a bad file fails in a second
        model = model_from_args(args)
        images = model.edit(source, args.instruction, num_inference_steps=args.steps,
                            guidance_scale=args.guidance, image_guidance_scale=args.image_guidance,
                            seed=args.seed, num_images_per_prompt=args.num_images, mode=args.mode,
                            progress=not args.quiet)
        for path in save_images(images, args.out, "edit", args.seed):
            print(path)
    elif args.command == "generate":
        model = model_from_args(args)
        images = model.text_to_image(args.prompt, height=args.height, width=args.width,
                                     num_inference_steps=args.steps, guidance_scale=args.guidance,
                                     seed=args.seed, num_images_per_prompt=args.num_images, mode=args.mode,
                                     progress=not args.quiet)
        for path in save_images(images, args.out, "generate", args.seed):
            print(path)
    else:
        if not args.question and not args.chat:
            raise UsageError("answer needs --question (repeat it for a conversation) or --chat")
        images = [read_image(p) for p in args.image]
        model = model_from_args(args)
        from .chat import ChatSession
        chat = ChatSession(model, images, max_new_tokens=args.max_new_tokens)
        for question in _questions(args):
            reply = chat.ask(question, stream=args.stream)
            if args.stream:
                for piece in reply:
                    print(piece, end="", flush=True)
                print()
            else:
                print(reply, flush=True)


def _questions(args):
    """The --question turns, then (with --chat) one per non-empty stdin line; a prompt only on a terminal."""
    yield from args.question
    if not args.chat:
        return
    interactive = sys.stdin.isatty()
    for n in itertools.count(1):
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        # Bytes where stdin has them, decoded here: undecodable input is reported, not a traceback.
        stream = getattr(sys.stdin, "buffer", sys.stdin)
        raw = stream.readline()
        if not raw:
            return
        try:
            line = raw.decode("utf-8") if isinstance(raw, bytes) else _utf8(raw, f"--chat: stdin line {n}")
        except UnicodeDecodeError as e:
            raise UsageError(f"--chat: stdin line {n} is not UTF-8 text (byte {e.start}); send UTF-8") from None
        if line.strip():
            yield line.strip()


@contextmanager
def _one_line_warnings():
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def main(argv: list[str] | None = None) -> int:
    try:
        with _one_line_warnings():
            run(build_parser().parse_args(argv))
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except (UsageError, ValueError, ImageInputError, CheckpointError) as e:
        message = " ".join(str(e).split())
        print(f"error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
