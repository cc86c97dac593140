"""Prompt-enhancement presets (system prompts) and the reply-language rule.

Each preset is a named constant with the reasoning behind it: what the target image models' own prompt
guides ask for. Every preset exists in English and in Chinese, because Qwen-Image, Qwen-Image-Edit, BAGEL
and Emu3.5 were trained on both and their guides rewrite Chinese prompts in Chinese (a translated prompt
loses the exact wording of text the user wants rendered).
"""
from __future__ import annotations

import re

PRESET_T2I = "t2i_rewrite"
PRESET_EDIT = "edit_rewrite"
PRESET_FREE = "free"
PRESETS = (PRESET_T2I, PRESET_EDIT, PRESET_FREE)
TASK_DESCRIBE = "describe"

LANG_AUTO = "auto"
LANG_EN = "en"
LANG_ZH = "zh"
LANGUAGES = (LANG_AUTO, LANG_EN, LANG_ZH)
LANGUAGE_NAMES = {LANG_EN: "English", LANG_ZH: "Chinese"}

# Text-to-image rewrite. Why each rule: the Qwen-Image prompt guide asks for one rich paragraph that keeps
# the user's intent and adds concrete visual facts (subject, attributes, setting, lighting, composition,
# style), because its MMDiT follows dense descriptions far better than keywords; text to be rendered must
# appear verbatim in double quotes (its main strength is exact text rendering, and a paraphrase or a
# translation changes the glyphs); no negations (a diffusion model sees the words, not the "no"); and a
# short quality suffix ("Ultra HD, 4K, cinematic composition" in its README) that it was tuned with.
T2I_SYSTEM_EN = (
    "You rewrite short image requests into one detailed prompt for a text-to-image model. Keep the user's "
    "intent and every object they name; add concrete visual details: the main subject and its attributes, "
    "the setting and background, lighting, colours, composition and camera view, and the artistic style. Any "
    "text that should appear in the image goes in double quotes, copied exactly, never translated, with its "
    "position and lettering. Describe what is there instead of using negations. Use at most 200 words, one "
    "paragraph, and end with \"Ultra HD, 4K, cinematic composition.\" Reply with the rewritten prompt only."
)
T2I_SYSTEM_ZH = (
    "你负责把简短的画面需求改写成一段详细的文生图提示词。保留用户的意图和提到的每个对象；补充具体的视觉细节："
    "主体及其属性、场景与背景、光线、色彩、构图与视角、艺术风格。需要出现在画面中的文字放在双引号里，原样照抄，"
    "不要翻译，并说明位置和字体。直接描述画面内容，不要使用否定句。不超过200字，写成一段，结尾加上“超清，4K，"
    "电影级构图。”只输出改写后的提示词。"
)

# Edit-instruction rewrite. Why each rule: the Qwen-Image-Edit guide recommends rewriting instructions
# before editing because the edit model is most stable with ONE concise, concrete, visually achievable
# instruction naming the operation (add / remove / replace / change an attribute / change the style), the
# target and where it is — looking at the input picture(s) to resolve "it" and "the left one"; text edits
# quote old and new text exactly; and what must stay unchanged (identity, pose, background) is said
# explicitly, since an unstated part is free to drift. Multi-image models refer to inputs as "Picture N".
EDIT_SYSTEM_EN = (
    "You rewrite image-editing instructions for an image-editing model. Look at the input picture(s) and "
    "turn the user's request into one concise, concrete and visually achievable instruction: name the "
    "operation (add, remove, replace, change colour/material/pose, change style), the exact target and its "
    "position, and the result. Quote text to add or replace in double quotes exactly as it should appear. "
    "State what must stay unchanged (identity, pose, background, composition). With several pictures, refer "
    "to them as Picture 1, Picture 2, ... Resolve vague or contradictory requests to the most plausible "
    "single edit. Reply with the rewritten instruction only."
)
EDIT_SYSTEM_ZH = (
    "你负责为图像编辑模型改写编辑指令。观察输入的图片，把用户的需求改写成一条简洁、具体、在画面上可实现的指令："
    "写明操作（添加、删除、替换、修改颜色/材质/姿态、改变风格）、准确的目标及其位置、以及期望的结果。要添加或"
    "替换的文字放在双引号里，与应出现的文字完全一致。写明哪些内容保持不变（人物身份、姿态、背景、构图）。有多张"
    "图片时，用“图1”、“图2”……指代。含糊或矛盾的需求改写为最合理的单一编辑。只输出改写后的指令。"
)

SYSTEMS = {PRESET_T2I: {LANG_EN: T2I_SYSTEM_EN, LANG_ZH: T2I_SYSTEM_ZH},
           PRESET_EDIT: {LANG_EN: EDIT_SYSTEM_EN, LANG_ZH: EDIT_SYSTEM_ZH}}

# What the user turn says when the prompt is empty but images are given: describe them (as a T2I prompt
# under the T2I preset, as an edit instruction idea under the edit preset, as plain text for describe).
EMPTY_PROMPT_TEXT = {
    PRESET_T2I: {LANG_EN: "Write a prompt that recreates this image.", LANG_ZH: "写一段能重现这张图片的提示词。"},
    PRESET_EDIT: {LANG_EN: "Suggest one edit that would improve this image.",
                  LANG_ZH: "为这张图片提出一个能让它更好的编辑。"},
    PRESET_FREE: {LANG_EN: "Describe this image.", LANG_ZH: "描述这张图片。"},
    TASK_DESCRIBE: {LANG_EN: "Describe this image in detail.", LANG_ZH: "详细描述这张图片。"},
}
# Appended to the system prompt when the user forces a reply language (auto keeps the prompt's language).
REPLY_LANGUAGE = {LANG_EN: " Write your reply in English.", LANG_ZH: " 请用中文回复。"}

# CJK Unified Ideographs (+ extension A, compatibility ideographs): Chinese text in a prompt.
_HAN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)


def detect_language(text: str) -> str:
    """'zh' when the text contains Chinese characters, else 'en' (the languages the presets are written in)."""
    return LANG_ZH if _HAN.search(text or "") else LANG_EN


def reply_language(language: str, prompt: str) -> str:
    return detect_language(prompt) if language == LANG_AUTO else language


def system_prompt(preset: str, language: str, prompt: str, free_system: str = "") -> str:
    """The system turn for a preset: in the reply language, with a forced-language sentence when asked."""
    lang = reply_language(language, prompt)
    base = free_system.strip() if preset == PRESET_FREE else SYSTEMS[preset][lang]
    return base + (REPLY_LANGUAGE[lang] if language != LANG_AUTO else "")


def strip_reasoning(text: str) -> tuple[str, bool]:
    """Drop <think>…</think> blocks (Qwen3-VL Thinking models); return (text, whether any was dropped)."""
    cleaned = _THINK.sub("", text)
    return cleaned.strip(), cleaned != text
