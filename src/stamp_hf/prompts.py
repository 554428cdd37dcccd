"""The paper's instruction templates (appendix, Prompts S1 and S2); `{}` is the referring expression or query.

Departures from the printed lists, each a typesetting slip: answer 9 of Prompt S1 is printed without `<|seg|>` and
gets it where every other answer has it (after the expression); the curly apostrophe of "Here’s" is a plain one.
"""

# Prompt S1: referring expression segmentation (RefCOCO, RefCOCO+, RefCOCOg, RefCLEF, gRefCOCO)
RES_QUESTIONS = (
    "Please segment only the {} in the image.",
    "Can you segment the {} in the image?",
    "Where is the {} in this picture? Please respond with segmentation mask.",
    "Where is {} in this image? Please output segmentation mask.",
    "Could you provide the segmentation mask for {} in this image?",
    "Please segment the image and highlight {}.",
)
RES_ANSWERS = (
    "Sure, here is the segmentation mask for {} <|seg|>:",
    "Here is the segmentation mask focusing on the {} <|seg|>:",
    "Here is the segmentation mask highlighting the {} <|seg|>:",
    "The segmentation map for {} <|seg|> is:",
    "The segmentation mask for {} <|seg|> is shown below:",
    "Sure, Here's the segmentation mask for {} <|seg|>:",
    "Sure, the segmented output for {} <|seg|> is:",
    "Certainly, the segmentation map for {} <|seg|> is:",
    "Certainly, here is the segmentation mask for {} <|seg|>:",
    "The segmentation mask for {} <|seg|> is shown below:",
)

# Prompt S2: reasoning segmentation (ReasonSeg); phrase queries take one of the questions, sentence queries the
# sentence form. The answers are printed with "<|seg|>." twice, so it is drawn half of the time.
REASON_QUESTIONS = (
    "Can you segment the {} in this image?",
    "Please segment the {} in this image.",
    "What is {} in this image? Please output segmentation mask.",
)
REASON_SENTENCE_QUESTION = "{} Please respond with segmentation mask."
REASON_ANSWERS = ("<|seg|>.", "Sure, <|seg|>.", "Sure, the segmentation result is <|seg|>.", "<|seg|>.")

__all__ = ["REASON_ANSWERS", "REASON_QUESTIONS", "REASON_SENTENCE_QUESTION", "RES_ANSWERS", "RES_QUESTIONS"]
