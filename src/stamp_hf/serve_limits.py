"""What one request to `stamp-hf serve` may hold. Its own module, free of heavy imports, so that `stamp-hf serve
--help` states the limits without importing Ray; stamp_hf.serve applies them (and re-exports them)."""

MAX_BODY_BYTES = 20 * 2**20  # a request body over this gets 413 (base64 makes a 15 MB image file about 20 MB)
MAX_TEXT_BYTES = 64 * 2**10  # the prompt, or all of a chat's contents together, in UTF-8
MAX_MESSAGES = 64  # messages of one chat request
MAX_IMAGE_PIXELS = 4096 * 4096  # refused from the file's header, before the pixels are decoded
MAX_NEW_TOKENS = 1024  # the most a request may ask for
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")


def limits_text() -> str:
    """The limits in one paragraph, for --help."""
    import textwrap

    return textwrap.fill(
        f"Limits per request: body {MAX_BODY_BYTES} bytes (413 beyond), prompt or chat text {MAX_TEXT_BYTES} bytes "
        f"(UTF-8), {MAX_MESSAGES} chat messages, image {MAX_IMAGE_PIXELS} pixels in {', '.join(IMAGE_FORMATS)}, "
        f"max_new_tokens 1..{MAX_NEW_TOKENS}; anything else wrong is a 400 with {{\"error\": \"<one line>\"}}.", 115)
