"""Where the load's texts come from: a corpus file, or generated text of chosen lengths.

A corpus file holds one text per line, or JSON Lines with a "text" field per
line (chosen by a `.jsonl` / `.ndjson` suffix, or when the first non-blank line
starts with "{"). Blank lines are skipped.

Generated text draws words from Faker's lorem word lists in several locales
when Faker is installed (`pip install "embedrpc[bench]"`), else from small
built-in word lists; each text is in one language, its length in words drawn
from a `LengthSpec`. Languages written without spaces (Chinese, Japanese, Thai)
join their words without spaces, so a "word" there is a dictionary word of one
to a few characters.

Given a vocabulary instead (`TextGenerator(words=...)`), a text is just words
drawn from it, joined by single spaces, with no sentences or punctuation: the
benchmarks use this for workloads whose token counts they control.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Documents: a long tail (median 40 words, 5% above ~150); queries: short.
DEFAULT_DOC_LENGTHS = "lognormal:40:0.8:4:400"
DEFAULT_QUERY_LENGTHS = "lognormal:8:0.4:2:32"
DEFAULT_LOCALES = ("en_US", "de_DE", "fr_FR", "es_ES", "it_IT", "pl_PL", "ru_RU", "ar_AA",
                   "zh_CN", "ja_JP", "vi_VN", "th_TH")
# Without Faker: the languages of the built-in word lists.
BUILTIN_LOCALES = ("en_US", "de_DE", "fr_FR", "es_ES", "ru_RU", "ar_AA", "zh_CN", "ja_JP")

# Built-in fallback: a few common words per language (connector, words).
_BUILTIN_WORDS: dict[str, tuple[str, str]] = {
    "en": (" ", "the time people year way day man thing woman life child world school state "
                "family student group country problem hand part place case week company "
                "system program question work government number night point home water "
                "room mother area money story fact month lot right study book eye job word "
                "business issue side kind head house service friend father power hour game "
                "line end member law car city community name president team minute idea"),
    "de": (" ", "Zeit Jahr Mensch Tag Kind Hand Stadt Frau Mann Leben Welt Haus Land Arbeit "
                "Frage Teil Schule Woche Familie Wasser Buch Auge Geld Wort Nacht Spiel "
                "Freund Vater Mutter Raum und oder aber nicht sehr gut neu groß klein alt "
                "machen sagen gehen sehen kommen wissen geben finden denken stehen liegen"),
    "fr": (" ", "temps année personne jour homme chose femme vie enfant monde école état "
                "famille groupe pays problème main partie lieu semaine entreprise question "
                "travail nombre nuit point maison eau mère argent histoire mois livre "
                "œil mot ville équipe idée et ou mais très bien nouveau grand petit faire "
                "dire aller voir venir savoir donner trouver penser être avoir"),
    "es": (" ", "tiempo año persona día hombre cosa mujer vida niño mundo escuela estado "
                "familia grupo país problema mano parte lugar semana empresa pregunta "
                "trabajo número noche punto casa agua madre dinero historia mes libro "
                "ojo palabra ciudad equipo idea y o pero muy bien nuevo grande pequeño "
                "hacer decir ir ver venir saber dar encontrar pensar"),
    "ru": (" ", "время год человек день жизнь рука работа слово место лицо друг глаз вопрос "
                "дом сторона страна мир случай голова ребенок сила конец вид система часть "
                "город отношение женщина деньги земля машина вода отец проблема час право "
                "нога решение дверь образ история и или но очень хорошо новый большой "
                "маленький делать сказать идти видеть знать думать"),
    "zh": ("", "时间 人们 今天 工作 问题 学生 学校 国家 世界 生活 公司 社会 经济 发展 技术 "
               "市场 城市 历史 文化 教育 研究 系统 信息 网络 数据 北京 上海 天气 朋友 家庭 "
               "孩子 老师 医院 科学 语言 模型 搜索 文档 首都 中国 可以 已经 没有 因为 所以 "
               "但是 如果 我们 他们 这个 那个 非常 重要"),
    "ja": ("", "時間 人 今日 仕事 問題 学生 学校 国 世界 生活 会社 社会 経済 発展 技術 "
               "市場 都市 歴史 文化 教育 研究 情報 東京 天気 友達 家族 子供 先生 病院 "
               "科学 言語 検索 文書 首都 日本 できる ある いる する なる 思う 言う 見る "
               "とても 大切 新しい 大きい 小さい"),
    "ar": (" ", "وقت سنة شخص يوم رجل شيء امرأة حياة طفل عالم مدرسة دولة عائلة مجموعة بلد "
                "مشكلة يد جزء مكان أسبوع شركة سؤال عمل حكومة رقم ليلة بيت ماء أم مال قصة "
                "شهر كتاب عين كلمة مدينة فريق فكرة و أو لكن جدا جيد جديد كبير صغير القاهرة "
                "عاصمة مصر"),
}
_FALLBACK_FOR_LOCALE = {"en": "en", "de": "de", "fr": "fr", "es": "es", "ru": "ru", "uk": "ru",
                        "zh": "zh", "ja": "ja", "ar": "ar"}


@dataclass(frozen=True, kw_only=True)
class LengthSpec:
    """A distribution of text lengths in words.

    Written as `fixed:N`, `uniform:MIN:MAX` (inclusive), or
    `lognormal:MEDIAN:SIGMA[:MIN:MAX]` (exp of a normal with mean ln(MEDIAN)
    and standard deviation SIGMA, rounded, clipped to MIN..MAX; default 1..1000).
    """

    kind: str
    low: int
    high: int
    median: float = 0.0
    sigma: float = 0.0

    @classmethod
    def parse(cls, text: str) -> LengthSpec:
        parts = text.strip().split(":")
        usage = ("expected fixed:N, uniform:MIN:MAX or lognormal:MEDIAN:SIGMA[:MIN:MAX] "
                 f"(lengths in words), got {text!r}")
        try:
            if parts[0] == "fixed" and len(parts) == 2:
                n = int(parts[1])
                spec = cls(kind="fixed", low=n, high=n)
            elif parts[0] == "uniform" and len(parts) == 3:
                spec = cls(kind="uniform", low=int(parts[1]), high=int(parts[2]))
            elif parts[0] == "lognormal" and len(parts) in (3, 5):
                low, high = (int(parts[3]), int(parts[4])) if len(parts) == 5 else (1, 1000)
                spec = cls(kind="lognormal", low=low, high=high, median=float(parts[1]),
                           sigma=float(parts[2]))
            else:
                raise ValueError(usage)
        except ValueError:
            raise ValueError(usage) from None
        if spec.low < 0 or spec.high < spec.low:
            raise ValueError(f"lengths need 0 <= MIN <= MAX, got {text!r}")
        if spec.kind == "lognormal" and not (spec.median > 0 and spec.sigma >= 0):
            raise ValueError(f"lognormal lengths need MEDIAN > 0 and SIGMA >= 0, got {text!r}")
        return spec

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"fixed:{self.low}"
        if self.kind == "uniform":
            return f"uniform:{self.low}:{self.high}"
        return f"lognormal:{self.median:g}:{self.sigma:g}:{self.low}:{self.high}"

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n lengths (int64)."""
        if self.kind == "fixed":
            return np.full(n, self.low, dtype=np.int64)
        if self.kind == "uniform":
            return rng.integers(self.low, self.high + 1, size=n)
        raw = np.rint(rng.lognormal(math.log(self.median), self.sigma, size=n))
        return np.clip(raw, self.low, self.high).astype(np.int64)


def load_corpus(path: str | Path) -> list[str]:
    """Texts from a file: one per line, or JSON Lines with a "text" string per line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValueError(f"cannot read corpus {str(path)!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"corpus {str(path)!r} is not UTF-8: {exc}") from None
    first = next((line for line in lines if line.strip()), "")
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson") or first.lstrip().startswith("{")
    texts: list[str] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not jsonl:
            texts.append(line)
            continue
        try:
            record: Any = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc.msg}); a JSON Lines corpus "
                             "needs one object with a \"text\" string per line") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{path}:{number}: expected an object with a \"text\" string")
        texts.append(record["text"])
    if not texts:
        raise ValueError(f"corpus {str(path)!r} holds no texts")
    return texts


class TextGenerator:
    """Multilingual text of chosen lengths, reproducible for a given seed."""

    def __init__(self, *, locales: Sequence[str] | None = None, seed: int = 0,
                 use_faker: bool | None = None, words: Sequence[str] | None = None) -> None:
        """locales: Faker locale names (default: DEFAULT_LOCALES with Faker, else
        BUILTIN_LOCALES); use_faker: None = when installed; words: a vocabulary to draw
        plain texts from instead of languages (then neither locales nor Faker apply)."""
        self.rng = np.random.default_rng(seed)
        self._sources: list[Any] = []
        self._vocabulary: tuple[str, ...] = ()
        if words is not None:
            if locales is not None or use_faker:
                raise ValueError("a vocabulary (words) replaces locales and Faker")
            self._vocabulary = tuple(words)
            if not self._vocabulary:
                raise ValueError("the vocabulary (words) is empty")
            self.locales: tuple[str, ...] = ()
            self.faker = False
            return
        faker = _import_faker() if use_faker in (None, True) else None
        if use_faker and faker is None:
            raise ValueError("Faker is not installed: pip install 'embedrpc[bench]'")
        if locales is None:
            locales = DEFAULT_LOCALES if faker is not None else BUILTIN_LOCALES
        if not locales:
            raise ValueError("at least one locale is needed")
        for i, locale in enumerate(locales):
            if faker is not None:
                try:
                    fake = faker.Faker(locale)
                except AttributeError:
                    raise ValueError(f"Faker has no locale {locale!r}") from None
                fake.seed_instance(seed * 1000 + i)
                self._sources.append(_FakerSource(fake))
            else:
                lang = _FALLBACK_FOR_LOCALE.get(locale.split("_")[0].lower())
                if lang is None:
                    raise ValueError(f"no built-in words for locale {locale!r} (without Faker "
                                     f"the languages are {', '.join(_FALLBACK_FOR_LOCALE)})")
                connector, words = _BUILTIN_WORDS[lang]
                self._sources.append(_WordListSource(connector, words.split(), self.rng))
        self.locales = tuple(locales)
        self.faker = faker is not None

    def texts(self, n: int, lengths: LengthSpec, *, query: bool = False) -> list[str]:
        """n texts; queries are one sentence ending in "?", documents several sentences
        (from a vocabulary: plain words, queries and documents alike)."""
        counts = lengths.sample(self.rng, n)
        if self._vocabulary:
            vocabulary = self._vocabulary
            return [" ".join([vocabulary[i] for i in
                              self.rng.integers(0, len(vocabulary), size=k).tolist()])
                    for k in counts.tolist()]
        picks = self.rng.integers(0, len(self._sources), size=n)
        out = []
        for words, pick in zip(counts.tolist(), picks.tolist(), strict=True):
            source = self._sources[pick]
            if query:
                out.append(source.sentence(words, "?"))
                continue
            sentences = []
            while words > 0:
                size = min(words, int(self.rng.integers(6, 17)))
                sentences.append(source.sentence(size, "."))
                words -= size
            out.append(" ".join(sentences))
        return out


class _FakerSource:
    def __init__(self, fake: Any) -> None:
        self.fake = fake

    def sentence(self, words: int, end: str) -> str:
        if words <= 0:
            return ""
        text: str = self.fake.sentence(nb_words=words, variable_nb_words=False)
        return text.rstrip(" .。") + end


class _WordListSource:
    def __init__(self, connector: str, words: list[str], rng: np.random.Generator) -> None:
        self.connector, self.words, self.rng = connector, words, rng

    def sentence(self, words: int, end: str) -> str:
        if words <= 0:
            return ""
        chosen = [self.words[i] for i in self.rng.integers(0, len(self.words), size=words)]
        chosen[0] = chosen[0][:1].upper() + chosen[0][1:]
        if not self.connector:  # Chinese, Japanese: full-width punctuation
            end = {".": "。", "?": "？"}.get(end, end)
        return self.connector.join(chosen) + end


def _import_faker() -> Any:
    try:
        import faker
    except ImportError:
        return None
    return faker
