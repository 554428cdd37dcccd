"""The STAMP web demo: a gradio page (single request and chat) and a `/segment` API endpoint, on the package's own
inference path (the `stamp-segmentation` pipeline for one request, `Conversation` for a chat).

    demo = build_demo(model, processor)        # a gr.Blocks with its queue set up
    demo.launch()

`stamp-hf demo` and the Space entry point (app.py) build it from the command-line options. Bad input (a file that is
not an image, an empty request, an image too large or too thin, a request over the context) becomes a readable line
in the page, or a `gradio.Error` with the same text for API clients; the server keeps serving. Each browser tab (or
API client session) has its own chat in a `gr.State`; model calls go through gradio's queue, `concurrency_limit` at
a time.
"""

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from an offline machine or a test

import gradio as gr  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from .conversation import Conversation  # noqa: E402
from .commands._common import mask_count  # noqa: E402
from .overlay import PALETTE, overlay_masks  # noqa: E402
from .pipeline_stamp import PIPELINE_TASK, check_prompt  # noqa: E402
from .processing_stamp import load_image  # noqa: E402

# The Okabe-Ito names of overlay.PALETTE, so the page can say which colour is which mask.
COLOUR_NAMES = ("orange", "sky blue", "bluish green", "yellow", "blue", "vermillion", "reddish purple")
EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"  # the repository's examples/ (absent in a wheel)
# (image in examples/, request): each is answered correctly by the bundled demo model (tests/test_webdemo.py)
EXAMPLES = (
    ("shapes.png", "Please segment the red circle."),
    ("shapes.png", "Please segment the blue triangle."),
    ("shapes.png", "Please segment the red diamond."),
    ("shapes.png", "Please segment the green square."),  # not in the image: the answer comes with an empty mask
    ("shapes.png", "Is the star big or small?"),
)
# questions the bundled demo model answers correctly on shapes.png, then a request (tests/test_webdemo.py asks the
# first, then the request); it answers "No, there is not." to every "Is there ...?" about that image (README)
CHAT_EXAMPLES = ("Is the star big or small?", "How many shapes are there?", "Please segment the red circle.")
MAX_IMAGE_PIXELS = 4096 * 4096  # larger uploads are refused: decoding them costs memory the model never uses
MAX_UPLOAD = "50mb"  # gradio refuses bigger files at upload, before anything reads them
CHAT_TTL_S = 3600  # a chat nobody touched for an hour is dropped with its cache
QUEUE_SIZE = 64  # requests waiting beyond this are turned away by gradio with "queue full"
FILES_TTL_S = 3600  # mask PNGs written for download are removed after an hour
THEME = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


class BadInput(ValueError):
    """Something the user gave that the demo cannot answer; its text is shown in the page as is."""


@dataclass
class Answer:
    """One answered request: the model's text, its masks, the overlay and the PNG files offered for download."""

    text: str
    masks: list = field(default_factory=list)
    overlay: Image.Image | None = None
    files: list[str] = field(default_factory=list)
    overlay_file: str | None = None  # the overlay as a PNG next to the masks (None without masks)
    seconds: dict = field(default_factory=dict)


@dataclass
class Chat:
    """One user's chat: the conversation (cache and image features) and the messages the Chatbot shows."""

    conversation: Conversation
    messages: list = field(default_factory=list)


class StampDemo:
    """What the page and the API call: model, processor, optional SAM refiner and the demo's limits."""

    def __init__(self, model, processor, refiner=None, max_new_tokens: int = 256,
                 max_image_pixels: int = MAX_IMAGE_PIXELS):
        from transformers import pipeline

        self.model, self.processor, self.refiner = model, processor, refiner
        self.pipe = pipeline(PIPELINE_TASK, model=model, processor=processor, device=model.device)
        self.max_new_tokens, self.max_image_pixels = max_new_tokens, max_image_pixels
        self.files = Path(tempfile.mkdtemp(prefix="stamp-demo-"))

    # ------------------------------------------------------------------ checks

    def read_upload(self, upload) -> Image.Image:
        """The uploaded image (gradio's file payload, a path or a PIL image), upright RGB, within the size limits."""
        if upload is None:
            raise BadInput("Upload an image first (drop a file, paste one or use the webcam).")
        source = upload.get("path") if isinstance(upload, dict) else upload  # gradio has put uploads in its cache
        name = (upload.get("orig_name") if isinstance(upload, dict) else None) or Path(str(source)).name
        try:
            image = load_image(source)
        except (ValueError, TypeError, OSError, Image.DecompressionBombError) as error:
            reason = _first_line(error).replace(f" '{source}'", "").replace(str(source), name)  # no server paths
            raise BadInput(f"{reason}.") from None  # the loader's message names the file: "x.png: cannot read it ..."
        if image.width * image.height > self.max_image_pixels:
            raise BadInput(f"{name} is {image.width}x{image.height} px, over the demo's limit of "
                           f"{self.max_image_pixels / 1e6:.1f} megapixels; upload a smaller image.")
        return image

    @staticmethod
    def check_request(text: str) -> str:
        """The request, stripped; refused when empty. (A request over the model's context is refused by
        generate_with_masks itself, with both lengths, and shown like any other model error.)"""
        try:
            return check_prompt(text).strip()
        except ValueError as error:
            raise BadInput(str(error)[0].upper() + str(error)[1:]) from None

    def refiner_for(self, refine: bool):
        if refine and self.refiner is None:
            raise BadInput("SAM refinement needs a SAM checkpoint: start the demo with --refine-sam CKPT.")
        return self.refiner if refine else None

    # ------------------------------------------------------------------ inference (the package's own path)

    def segment(self, upload, prompt: str, refine=False, threshold=None, max_new_tokens=None) -> Answer:
        """One request through the `stamp-segmentation` pipeline."""
        max_new_tokens = int(max_new_tokens or self.max_new_tokens)
        start = time.perf_counter()
        prompt = self.check_request(prompt)
        refiner = self.refiner_for(refine)
        image = self.read_upload(upload)
        read = time.perf_counter()
        try:
            result = self.pipe(image, prompt, max_new_tokens=max_new_tokens, threshold=threshold,
                               refine=refiner is not None, sam_model=refiner)
        except (ValueError, TypeError) as error:  # e.g. an image too thin for the vision tower's patches
            raise BadInput(f"The model cannot answer this: {_first_line(error)}") from None
        return self._answer(image, result, start, read)

    def ask(self, chat: "Chat | None", upload, text: str, refine=False, threshold=None, max_new_tokens=None):
        """A chat turn through `Conversation`: the first turn reads the image, later ones reuse its cache."""
        max_new_tokens = int(max_new_tokens or self.max_new_tokens)
        start = time.perf_counter()
        text = self.check_request(text)
        refiner = self.refiner_for(refine)
        if chat is None:
            chat = Chat(Conversation(self.model, self.processor, self.read_upload(upload)))
        read = time.perf_counter()
        chat.conversation.threshold, chat.conversation.refiner = threshold, refiner
        try:
            result = chat.conversation.ask(text, max_new_tokens=max_new_tokens)
        except (ValueError, TypeError) as error:
            raise BadInput(f"The model cannot answer this: {_first_line(error)}") from None
        return chat, text, self._answer(chat.conversation.image, result, start, read)

    def _answer(self, image, result: dict, start: float, read: float) -> Answer:
        answered = time.perf_counter()
        masks = result["masks"]
        overlay = overlay_masks(image, [m["mask"] for m in masks]) if masks else image
        answer = Answer(result["text"], masks, overlay)
        if masks:
            self._write_files(answer)
        done = time.perf_counter()
        answer.seconds = {"image": read - start, "model": answered - read, "overlay": done - answered,
                          "total": done - start}
        return answer

    def _write_files(self, answer: Answer) -> None:
        """Each mask as a PNG (0 / 255) and the overlay in a fresh folder, for downloads and the chat; folders older
        than FILES_TTL_S go."""
        for old in self.files.iterdir():
            if time.time() - old.stat().st_mtime > FILES_TTL_S:
                shutil.rmtree(old, ignore_errors=True)
        folder = Path(tempfile.mkdtemp(dir=self.files))
        for k, entry in enumerate(answer.masks, 1):
            entry["mask"].save(folder / f"mask_{k}.png")
            answer.files.append(str(folder / f"mask_{k}.png"))
        answer.overlay.save(folder / "overlay.png")
        answer.overlay_file = str(folder / "overlay.png")


# ---------------------------------------------------------------------- what the page shows


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def colour_name(k: int) -> str:
    return COLOUR_NAMES[k % len(COLOUR_NAMES)]


def mask_titles(answer: Answer) -> list[str]:
    """"mask k: label" for each mask, numbered from 1 as the PNG files are."""
    return [f"mask {k}: {m['label'] or '(no label)'}" for k, m in enumerate(answer.masks, 1)]


def legend(answer: Answer) -> list[tuple[str, str]]:
    """HighlightedText entries: each mask's title in its overlay colour."""
    return [(title + " ", colour_name(k)) for k, title in enumerate(mask_titles(answer))]


COLOUR_MAP = {name: "#%02x%02x%02x" % rgb for name, rgb in zip(COLOUR_NAMES, PALETTE)}


def timing_line(answer: Answer) -> str:
    s = answer.seconds
    return (f"Answered in {s['total']:.2f} s (image {s['image']:.2f} s, model {s['model']:.2f} s, overlay "
            f"{s['overlay']:.2f} s); {mask_count(answer.masks)}.")


def problem(message: str) -> str:
    return f"**Problem:** {message}"


def chat_entry(answer: Answer) -> dict:
    """The assistant message: the answer (the `<|seg|>` tokens kept visible) and, under it, its masks' overlay."""
    text = answer.text.replace("<|seg|>", "`<|seg|>`")
    if not answer.masks:
        return {"role": "assistant", "content": text}
    names = ", ".join(f"{title} ({colour_name(k)})" for k, title in enumerate(mask_titles(answer)))
    return {"role": "assistant", "content": [text, {"path": answer.overlay_file, "alt_text": names}, names]}


# ---------------------------------------------------------------------- the page


def build_demo(model, processor, refiner=None, max_new_tokens: int = 256, concurrency_limit: int = 1,
               max_image_pixels: int = MAX_IMAGE_PIXELS, examples_dir: Path = EXAMPLES_DIR,
               model_name: str | None = None) -> gr.Blocks:
    """The demo page and its `/segment` endpoint for a loaded STAMP model, its queue set to run `concurrency_limit`
    model calls at a time (every event shares one concurrency group: they share the model). `model_name`: what the
    page calls the model (default: the folder or Hub id it was loaded from)."""
    app = StampDemo(model, processor, refiner, max_new_tokens, max_image_pixels)
    threshold_default = float(model.config.mask_threshold)
    queued = dict(concurrency_limit=concurrency_limit, concurrency_id="model", preprocess=False)

    def run_segment(upload, prompt, refine, threshold, tokens, progress=gr.Progress()):
        progress(0.1, desc="Segmenting")
        try:
            answer = app.segment(upload, prompt, refine, threshold, tokens)
        except BadInput as error:
            return "", None, [], [], problem(str(error))
        return answer.text, answer.overlay, legend(answer), answer.files, timing_line(answer)

    def api_segment(upload, prompt):
        """(answer text, overlay image, mask PNGs) for an image and a request; a bad input is a gradio error."""
        try:
            answer = app.segment(upload, prompt)
        except BadInput as error:
            raise gr.Error(str(error), title="Bad input", print_exception=False) from None
        return answer.text, answer.overlay, answer.files

    def run_chat(upload, text, chat, refine, threshold, tokens, progress=gr.Progress()):
        progress(0.1, desc="Thinking")
        try:
            chat, text, answer = app.ask(chat, upload, text, refine, threshold, tokens)
        except BadInput as error:
            return gr.skip(), chat, gr.skip(), gr.skip(), problem(str(error))
        chat.messages += [{"role": "user", "content": text}, chat_entry(answer)]
        return chat.messages, chat, "", answer.files, timing_line(answer)

    def new_chat():
        return [], None, [], "New chat: ask a first question about the image."

    with gr.Blocks(title="STAMP segmentation demo", delete_cache=(FILES_TTL_S, FILES_TTL_S)) as demo:
        gr.Markdown(_intro(model_name or model.config._name_or_path or "STAMP", refiner))
        chat_state = gr.State(None, time_to_live=CHAT_TTL_S)
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(label="Image", type="filepath", sources=["upload", "clipboard", "webcam"],
                                 height=320, elem_id="image")
                with gr.Accordion("Options", open=False):
                    refine = gr.Checkbox(label="Refine masks with SAM", value=False, interactive=refiner is not None,
                                         info=None if refiner is not None else "start the demo with --refine-sam CKPT")
                    threshold = gr.Slider(-4.0, 4.0, value=threshold_default, step=0.1, label="Mask threshold (logit)",
                                          info="0 = probability 0.5; lower keeps more of each mask")
                    tokens = gr.Slider(1, max(1024, max_new_tokens), value=max_new_tokens, step=1,
                                       label="Max new tokens")
            with gr.Column(scale=2):
                with gr.Tab("Single request"):
                    prompt = gr.Textbox(label="Request", placeholder="Please segment the red circle.",
                                        elem_id="prompt")
                    segment_button = gr.Button("Segment", variant="primary", elem_id="segment")
                    status = gr.Markdown(label="Status", elem_id="status")
                    answer = gr.Textbox(label="Answer", interactive=False, elem_id="answer")
                    with gr.Row():
                        overlay = gr.Image(label="Overlay", type="pil", format="png", interactive=False,
                                           height=320, elem_id="overlay")
                        with gr.Column():
                            labels = gr.HighlightedText(label="Masks", color_map=COLOUR_MAP, show_legend=False,
                                                        elem_id="labels")
                            mask_files = gr.Files(label="Masks as PNG", interactive=False, elem_id="mask_files")
                    examples = [[str(examples_dir / name), text] for name, text in EXAMPLES
                                if (examples_dir / name).is_file()]
                    if examples:
                        gr.Examples(examples, inputs=[image, prompt], label="Examples (the bundled demo model answers them)")
                with gr.Tab("Chat"):
                    chatbot = gr.Chatbot(label="Chat about the image", height=560, elem_id="chatbot")
                    message = gr.Textbox(label="Message", placeholder="Is the star big or small?", elem_id="message")
                    with gr.Row():
                        send = gr.Button("Send", variant="primary", elem_id="send")
                        clear = gr.Button("New chat", elem_id="new_chat")
                    chat_status = gr.Markdown(label="Status", elem_id="chat_status")
                    chat_files = gr.Files(label="Masks of the last answer as PNG", interactive=False)
                    gr.Examples([[text] for text in CHAT_EXAMPLES], inputs=[message], label="Questions to try")

        segment_inputs = [image, prompt, refine, threshold, tokens]
        segment_outputs = [answer, overlay, labels, mask_files, status]
        gr.on([segment_button.click, prompt.submit], run_segment, segment_inputs, segment_outputs,
              api_visibility="private", **queued)
        chat_inputs = [image, message, chat_state, refine, threshold, tokens]
        chat_outputs = [chatbot, chat_state, message, chat_files, chat_status]
        gr.on([send.click, message.submit], run_chat, chat_inputs, chat_outputs, api_name="chat", **queued)
        gr.on([clear.click, image.change], new_chat, None, [chatbot, chat_state, chat_files, chat_status],
              api_visibility="private", queue=False)
        # The API endpoint: (image, request) -> (answer, overlay, mask PNGs). Its trigger is never shown.
        gr.Button(visible=False).click(api_segment, [image, prompt], [answer, overlay, mask_files],
                                       api_name="segment", **queued)
    demo.queue(default_concurrency_limit=concurrency_limit, max_size=QUEUE_SIZE)
    demo.stamp_app = app  # for tests and callers that want the demo's own checks
    return demo


def default_concurrency(device) -> int:
    """Model calls the demo runs at once unless told: calls on one shared model are safe (README, "One model, many
    callers"). On a GPU, four overlap one request's Python and transfers with another's kernels; on a CPU, torch
    already spreads one call over every core, and two at once fill the gaps between its operations
    (benchmarks/serve.py measures both against one at a time)."""
    return 4 if torch.device(device).type == "cuda" else 2


def _intro(name: str, refiner) -> str:
    sam = "SAM refinement available." if refiner is not None else "No SAM checkpoint loaded."
    return (f"## STAMP: segment what you describe\nModel: {name}. {sam} Upload an image, type a request, press "
            "**Segment**, or chat about the image in the **Chat** tab (follow-ups reuse the conversation's cache).")


def launch(demo: gr.Blocks, host: str | None = None, port: int | None = None, share: bool = False):
    """Serve the demo (blocks until stopped). host/port None: gradio's defaults and its GRADIO_SERVER_* variables."""
    demo.launch(server_name=host, server_port=port, share=share, theme=THEME, show_error=False,
                max_file_size=MAX_UPLOAD)
