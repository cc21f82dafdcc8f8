"""Prompts for the VLM, in English and Korean, for the CT slice and the exterior photo.

Each prompt grounds the model in what the statistical system found (the CNN's class and
probabilities, the hot region of Grad-CAM; the autoencoder's score against its threshold
and the regions over it) and asks for one JSON object with fixed keys, so answers can be
compared across cells and across backends.
"""

from __future__ import annotations

import json
import re

FINDING_KEYS = ("class", "verdict", "confidence", "location", "cause", "action")
LANGUAGES = ("en", "ko")

_CT = {
    "en": (
        "You are a battery manufacturing quality engineer reviewing a CT slice of a lithium-ion {battery} "
        "(slice axis {axis}). The first image is the slice as the classifier saw it; the second overlays its "
        "Grad-CAM heatmap (red = evidence for the predicted class, green boxes = hottest regions).\n"
        "The CNN classifier says: {ct_class} with probability {ct_p:.3f}; probability of a defect {defect_p:.3f}. "
        "Class probabilities: {probs}. Hot regions (x0, y0, x1, y1 in a {size}x{size} image): {regions}.\n"
        "Possible classes: {classes}.\n"
        "Check the image yourself; agree with the classifier only if the image supports it. "
        "Answer with one JSON object and nothing else, with these keys: "
        '"class" (one of the possible classes), "verdict" ("defect" or "normal"), "confidence" (0 to 1), '
        '"location" (where in the image, in words and coordinates), "cause" (the likely manufacturing cause), '
        '"action" (what the line should do with this cell).'
    ),
    "ko": (
        "당신은 리튬이온 배터리 제조 품질 엔지니어입니다. {battery}의 CT 단면(슬라이스 축 {axis})을 검토합니다. "
        "첫 번째 이미지는 분류기가 본 단면이고, 두 번째 이미지는 Grad-CAM 히트맵을 겹친 것입니다 "
        "(빨간색 = 예측 클래스의 근거, 초록 상자 = 가장 강한 영역).\n"
        "CNN 분류기 결과: {ct_class}, 확률 {ct_p:.3f}; 결함 확률 {defect_p:.3f}. 클래스별 확률: {probs}. "
        "강한 영역 ({size}x{size} 이미지의 x0, y0, x1, y1): {regions}.\n"
        "가능한 클래스: {classes}.\n"
        "이미지를 직접 확인하고, 이미지가 뒷받침할 때만 분류기에 동의하십시오. "
        "다른 말 없이 JSON 객체 하나로만 답하십시오. 키: "
        '"class" (가능한 클래스 중 하나), "verdict" ("defect" 또는 "normal"), "confidence" (0~1), '
        '"location" (이미지 내 위치: 설명과 좌표), "cause" (추정되는 제조 원인), '
        '"action" (라인에서 이 셀에 취할 조치). '
        "값은 한국어로 쓰십시오 (class와 verdict는 주어진 영어 값 그대로)."
    ),
}

_RGB = {
    "en": (
        "You are a battery manufacturing quality engineer reviewing an exterior photo of a lithium-ion {battery}. "
        "The first image is the photo as the anomaly detector saw it; the second overlays its reconstruction "
        "error (bright = unusual, cyan contour = over the threshold, green boxes = anomalous regions).\n"
        "The autoencoder's anomaly score is {score:.5f} against a threshold of {threshold:.5f}: {state}. "
        "Anomalous regions (x0, y0, x1, y1 in a {size}x{size} image): {regions}.\n"
        "Possible classes: {classes}.\n"
        "Check the image yourself; agree with the detector only if the image supports it. "
        "Answer with one JSON object and nothing else, with these keys: "
        '"class" (one of the possible classes), "verdict" ("defect" or "normal"), "confidence" (0 to 1), '
        '"location" (where on the battery, in words and coordinates), "cause" (the likely manufacturing or '
        'handling cause), "action" (what the line should do with this cell).'
    ),
    "ko": (
        "당신은 리튬이온 배터리 제조 품질 엔지니어입니다. {battery}의 외관 사진을 검토합니다. "
        "첫 번째 이미지는 이상 탐지기가 본 사진이고, 두 번째 이미지는 복원 오차를 겹친 것입니다 "
        "(밝을수록 이상, 청록 윤곽선 = 임계값 초과, 초록 상자 = 이상 영역).\n"
        "오토인코더 이상 점수 {score:.5f}, 임계값 {threshold:.5f}: {state}. "
        "이상 영역 ({size}x{size} 이미지의 x0, y0, x1, y1): {regions}.\n"
        "가능한 클래스: {classes}.\n"
        "이미지를 직접 확인하고, 이미지가 뒷받침할 때만 탐지기에 동의하십시오. "
        "다른 말 없이 JSON 객체 하나로만 답하십시오. 키: "
        '"class" (가능한 클래스 중 하나), "verdict" ("defect" 또는 "normal"), "confidence" (0~1), '
        '"location" (배터리 위의 위치: 설명과 좌표), "cause" (추정되는 제조·취급 원인), '
        '"action" (라인에서 이 셀에 취할 조치). '
        "값은 한국어로 쓰십시오 (class와 verdict는 주어진 영어 값 그대로)."
    ),
}

RGB_CLASSES = ("normal", "scratch", "dent", "stain", "contamination", "swelling", "other")
_STATE = {"en": ("above: anomalous", "not above: normal"), "ko": ("초과: 이상", "이하: 정상")}
_BATTERY = {"en": ("cell", "module"), "ko": ("셀", "모듈")}


def _regions(boxes) -> str:
    return ", ".join(str(b.to_dict()["box"]) for b in boxes) or "none"


def ct_prompt(inspection, meta, boxes, size: int, lang: str = "en") -> str:
    probs = ", ".join(f"{c} {p:.3f}" for c, p in inspection.ct_probs.items())
    return _CT[_lang(lang)].format(
        battery=_BATTERY[_lang(lang)][int(meta[0])],
        axis="xyz"[int(meta[1])],
        ct_class=inspection.ct_class,
        ct_p=inspection.ct_probs[inspection.ct_class],
        defect_p=inspection.ct_defect_probability,
        probs=probs,
        regions=_regions(boxes),
        size=size,
        classes=", ".join(inspection.ct_probs),
    )


def rgb_prompt(inspection, meta, boxes, size: int, lang: str = "en") -> str:
    return _RGB[_lang(lang)].format(
        battery=_BATTERY[_lang(lang)][int(meta[0])],
        score=inspection.rgb_score,
        threshold=inspection.rgb_threshold,
        state=_STATE[_lang(lang)][0 if inspection.rgb_anomalous else 1],
        regions=_regions(boxes),
        size=size,
        classes=", ".join(RGB_CLASSES),
    )


def _lang(lang: str) -> str:
    if lang not in LANGUAGES:
        raise ValueError(f"prompt language must be one of {', '.join(LANGUAGES)}, got {lang!r}")
    return lang


_NUMBER = r"\s*(-?\d+(?:\.\d+)?)\s*"
_BOX = re.compile(r"[\[(]" + ",".join([_NUMBER] * 4) + r"[\])]")


def location_box(location, size: int) -> list[int] | None:
    """The first box "[x0, y0, x1, y1]" (or in parentheses) of an answer's location, clipped to the
    size x size image the prompt speaks of; None when it gives none, or an empty one."""
    if not isinstance(location, str):
        return None
    for match in _BOX.finditer(location):
        x0, y0, x1, y1 = (min(max(int(round(float(v))), 0), size) for v in match.groups())
        if x1 > x0 and y1 > y0:
            return [x0, y0, x1, y1]
    return None


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


def parse_finding(text: str) -> dict:
    """A VLM answer -> {"finding": {...}, "malformed": False} or, when it is not the JSON object
    asked for, {"raw": text, "malformed": True, "problem": why}; the raw text is always kept."""
    text = text or ""
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start : end + 1])
    problem = "the answer holds no JSON object"
    for c in candidates:
        try:
            value = json.loads(c.strip())
        except ValueError:
            continue
        if not isinstance(value, dict):
            problem = f"the answer is JSON but a {type(value).__name__}, not an object"
            continue
        missing = [k for k in FINDING_KEYS if k not in value]
        out = {"finding": {k: value.get(k) for k in FINDING_KEYS}, "malformed": bool(missing), "raw": text}
        if missing:
            out["problem"] = f"missing keys: {', '.join(missing)}"
        return out
    return {"raw": text, "malformed": True, "problem": problem}
