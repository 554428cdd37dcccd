import os
import tempfile

import numpy as np
from PIL import Image, ImageDraw

from stamp_hf.demo_model import DEMO_MODEL  # before transformers: stamp_hf drops torchao's two import-time notices
from transformers import AutoModel, AutoProcessor  # noqa: I001

# A released checkpoint loads like any Hub model:
#   model = AutoModel.from_pretrained("org/stamp-2b", trust_remote_code=True)
#   processor = AutoProcessor.from_pretrained("org/stamp-2b", trust_remote_code=True)
# Here: the bundled demo model, a small STAMP built offline on synthetic shapes (demo_model/README.md), so the
# answers and masks below are real ones.
model = AutoModel.from_pretrained(DEMO_MODEL, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(DEMO_MODEL, trust_remote_code=True)

image = Image.new("RGB", (320, 240), "white")
ImageDraw.Draw(image).ellipse((40, 60, 130, 150), fill="red")
ImageDraw.Draw(image).rectangle((190, 90, 270, 170), fill="blue")
circle = Image.new("1", image.size)
ImageDraw.Draw(circle).ellipse((40, 60, 130, 150), fill=1)
circle = np.array(circle)  # the true mask of the red circle
question = {"role": "user", "content": [{"type": "image", "image": image},
                                        {"type": "text", "text": "Please segment the red circle."}]}

# 1. Chat and segment: phase 1 generates text; every <|seg|> it emits gets a mask in one extra forward.
inputs = processor.apply_chat_template([question], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
out = model.generate_with_masks(**inputs, max_new_tokens=12)
(result,) = processor.post_process_generation(out, inputs["input_ids"].shape[1], [(image.height, image.width)],
                                              stop_ids=model.generation_config.eos_token_id)
print("response:", result["text"])
mask = result["masks"][0]["mask"]  # a boolean array at the image's size, with its label, score and image index
print("mask:", mask.shape, f"IoU with the red circle: {(mask & circle).sum() / (mask | circle).sum():.2f}")

# 2. Teacher-forced: masks for the <|seg|> tokens of a given answer (the training-time view).
answer = {"role": "assistant", "content": "Sure, it is <|seg|>."}
forced = processor.apply_chat_template([question, answer], tokenize=True, return_dict=True, return_tensors="pt",
                                       sanitize_control_tokens=False)  # trusted text: <|seg|> is the control token
(logits,), = model.predict_masks(**forced)
(mask,), = processor.post_process_masks([[logits]], target_sizes=[(image.height, image.width)])
print("patch grid:", tuple(logits.shape), "-> mask:", tuple(mask.shape), "foreground pixels:", int(mask.sum()))

# 3. Save as a Hub repo folder (config with auto_map + remote code + safetensors) and load it back.
with tempfile.TemporaryDirectory() as folder:
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    reloaded = AutoModel.from_pretrained(folder, trust_remote_code=True)
    print("reloaded:", type(reloaded).__name__, "from", sorted(f for f in os.listdir(folder) if f.endswith(".py")))
