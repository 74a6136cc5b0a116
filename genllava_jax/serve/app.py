"""genllava-serve: the web demo. A Gradio chat over a trained workdir's Assistant: upload an image and ask about
it, generate an image, or edit the last image (uploaded or generated); answers stream in and images show inline.

    genllava-serve --workdir=runs/demo/train [--port=7860]      # then open http://localhost:7860

Turns that arrive together are run as one batch (worker.py); at start-up every length bucket is compiled once.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path

from absl import flags

from genllava_jax import errors, infer
from genllava_jax.serve.worker import MODES, Turn, UserError, Worker

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a demo on a closed network


@dataclasses.dataclass(frozen=True)
class Conversation:
    """A session's model-side state: the last image (uploaded or generated) and the chat turns about it."""
    image: object = None
    history: tuple = ()


def _files(message) -> list[str]:
    files = (message or {}).get("files") or []
    return [f if isinstance(f, str) else f.get("path") for f in files]


def turn_handler(worker: Worker, out_dir: Path):
    """The chat box's handler: a generator of (chat messages, conversation, cleared box)."""

    def handle(message, mode, temperature, top_p, steps, guidance, seed, chat, conv):
        conv = conv if isinstance(conv, Conversation) else Conversation()
        chat = list(chat or [])
        text = ((message or {}).get("text") or "").strip()
        files = _files(message)

        def fail(msg):
            chat.append({"role": "assistant", "content": f"⚠️ {msg}"})
            return chat, conv, None

        image, history = conv.image, conv.history
        if files:
            chat.append({"role": "user", "content": {"path": files[-1]}})
            try:
                image, history = worker.open_image(files[-1]), ()  # a new image starts a new conversation
            except UserError as e:
                yield fail(e)
                return
        if text:
            chat.append({"role": "user", "content": text})
        settings = dataclasses.replace(worker.defaults, temperature=float(temperature), top_p=float(top_p),
                                       num_steps=int(steps), guidance_scale=float(guidance), seed=int(seed or 0))
        turn = Turn(mode, text, image, history, settings)
        chat.append({"role": "assistant", "content": ""})
        for kind, value in worker.events(turn):
            if kind == "text":
                chat[-1]["content"] += value
                yield chat, conv, None
            elif kind == "error":
                chat.pop()
                # the upload stays the conversation's image even if the question was refused
                conv = Conversation(image, history) if files and image is not None else conv
                yield fail(value)
                return
            else:
                reply = value
                if reply.text or reply.image is None:
                    chat[-1]["content"] = reply.text or "(no answer)"
                else:
                    chat.pop()  # the image alone is the answer
                if mode == "chat":
                    user = f"<image>\n{text}" if image is not None and not history else text
                    conv = Conversation(image, (*history, (user, reply.text)))
                if reply.image is not None:
                    path = out_dir / f"{time.time_ns()}.png"
                    from PIL import Image

                    Image.fromarray(reply.image).save(path)
                    chat.append({"role": "assistant", "content": {"path": str(path)}})
                    conv = Conversation(Image.fromarray(reply.image), ())  # the last image: edits take it
                yield chat, conv, None

    return handle


def build(worker: Worker, out_dir: Path | None = None, title: str = "GenLLaVA"):
    """The Gradio page over a worker (not launched)."""
    import gradio as gr

    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="genllava-serve-"))
    d = worker.defaults
    with gr.Blocks(title=title) as page:
        gr.Markdown(f"## {title}\nUpload an image and ask about it, ask for a picture (**generate**), or change "
                    "the last image (**edit**). Answers stream in; images are drawn by the model's own "
                    "[SOI] tokens through its Q-former and diffusion sampler.")
        chat = gr.Chatbot(label="conversation", height=560, elem_id="chat")
        conv = gr.State(Conversation())
        mode = gr.Radio(list(MODES), value="chat", label="turn", elem_id="mode")
        box = gr.MultimodalTextbox(file_types=["image"], placeholder="Ask, or describe an image to draw / an edit",
                                   show_label=False, elem_id="box")
        with gr.Accordion("settings", open=False):
            with gr.Row():
                temperature = gr.Slider(0.0, 1.5, value=d.temperature, step=0.1, label="temperature (0: greedy)")
                top_p = gr.Slider(0.05, 1.0, value=d.top_p, step=0.05, label="top-p")
            with gr.Row():
                steps = gr.Slider(1, 100, value=d.num_steps, step=1, label="sampler steps")
                guidance = gr.Slider(1.0, 15.0, value=d.guidance_scale, step=0.5, label="guidance")
                seed = gr.Number(value=d.seed, precision=0, minimum=0, label="seed")
            gr.Markdown("A new temperature, top-p or step count compiles once when first used.")
        clear = gr.Button("clear", elem_id="clear")
        box.submit(turn_handler(worker, out_dir), [box, mode, temperature, top_p, steps, guidance, seed, chat, conv],
                   [chat, conv, box], api_name="turn", concurrency_limit=worker.batcher.max_pending + worker.batch_size)
        clear.click(lambda: ([], Conversation(), None), None, [chat, conv, box], api_name="clear")
    return page


def define_flags():
    flags.DEFINE_string("workdir", None, "training workdir (checkpoints/, config.json)", required=True)
    flags.DEFINE_string("host", "127.0.0.1", "address to listen on (0.0.0.0 for every interface)")
    flags.DEFINE_integer("port", 7860, "port to listen on")
    flags.DEFINE_integer("context", None, "longest prompt taken, in tokens (default: the run's data.max_len)")
    flags.DEFINE_integer("max_new_tokens", 32, "answer length limit")
    flags.DEFINE_integer("batch_size", 4, "rows of one jitted call: turns arriving together share it")
    flags.DEFINE_float("batch_wait_ms", 10.0, "how long a batch waits to fill after its first turn arrives")
    flags.DEFINE_integer("max_pending", 16, "turns waiting beyond this get a 'busy' answer")
    flags.DEFINE_integer("max_pixels", 4096 * 4096, "larger uploads are refused (read from the header)")
    flags.DEFINE_integer("steps", 25, "default sampler steps")
    flags.DEFINE_float("guidance", 3.0, "default classifier-free guidance")
    flags.DEFINE_enum("scheduler", "ddim", ["ddim", "euler"], "diffusion sampler")


def make_worker(workdir, *, context=None, defaults=infer.Settings(), batch_size=4, batch_wait_ms=10.0,
                max_pending=16, max_pixels=4096 * 4096) -> Worker:
    """A Worker over the newest checkpoint of a training workdir (context: its data.max_len unless given)."""
    from genllava_jax.cli import load_assistant

    assistant, c = load_assistant(workdir)
    return Worker(assistant, context=context or c.data.max_len, defaults=defaults, batch_size=batch_size,
                  wait_s=batch_wait_ms / 1000, max_pending=max_pending, max_pixels=max_pixels)


# the demo's images are tiny (16 px): shown larger, pixels kept sharp
CSS = ("#chat img { min-width: 128px !important; min-height: 128px !important; object-fit: contain !important;"
       " image-rendering: pixelated; }")


def launch(worker: Worker, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Builds the page and serves it; with block=False it returns the page (page.close() stops it)."""
    page = build(worker)
    limit = worker.batcher.max_pending + worker.batch_size
    page.queue(max_size=4 * limit)  # gradio's own queue, behind the worker's "busy" answer
    page.launch(server_name=host, server_port=port, max_threads=2 * limit + 8, max_file_size="50mb",
                footer_links=["api"], css=CSS, prevent_thread_lock=not block, quiet=not block)
    return page


def _main(argv):
    del argv
    F = flags.FLAGS
    for name, low in (("batch_size", 1), ("max_pending", 1), ("max_new_tokens", 1), ("steps", 1), ("port", 1),
                      ("max_pixels", 1), ("batch_wait_ms", 0)):
        if F[name].value < low:
            raise errors.BadValue(f"--{name}={F[name].value}: must be at least {low}")
    if F.context is not None and F.context < 8:
        raise errors.BadValue(f"--context={F.context}: too short for a prompt (at least 8 tokens)")
    defaults = infer.Settings(max_new_tokens=F.max_new_tokens, num_steps=F.steps, guidance_scale=F.guidance,
                              sampler=F.scheduler)
    worker = make_worker(F.workdir, context=F.context, batch_size=F.batch_size, batch_wait_ms=F.batch_wait_ms,
                         max_pending=F.max_pending, max_pixels=F.max_pixels, defaults=defaults)
    worker.warm_up()
    print(f"serving {F.workdir} on http://{F.host}:{F.port}", flush=True)
    launch(worker, F.host, F.port)


def main():
    define_flags()
    errors.run(_main)


if __name__ == "__main__":
    main()
