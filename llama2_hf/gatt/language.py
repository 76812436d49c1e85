"""Light-weight language identification for GAtt's language constraint (no downloads)."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

# Frequent function words, chosen to separate the Latin-script languages (shared words count for every language).
_STOPWORDS: dict[str, str] = {
    "English": "the and is are you your of to in that it was for with this have be not on what my me we they do can "
               "will would about there from at but or so very like just how an i'm it's don't",
    "French": "le la les et est je vous tu nous une des du dans pour pas que qui sur avec ce cette mais très bien "
              "suis êtes mon ma mes votre au aux sont être oui non aussi comme où il elle ils j'aime c'est",
    "Spanish": "el la los las y es yo usted tú una un del en para por que con pero muy mi su está estoy son como "
               "más qué también hay sí nosotros porque cuando soy eres gracias me gusta",
    "German": "der die das und ist ich sie du wir ein eine nicht mit auf für zu von den dem es sehr auch aber oder "
              "wie was mein ihr bin sind haben habe gut danke ja nein gerne heute immer",
    "Italian": "il lo la gli le e è io lei tu noi un una di del della che per con non sono molto mi ti ma anche come "
               "questo questa sei siamo ciao grazie perché più cosa mio mia",
    "Portuguese": "o a os as e é eu você um uma de do da dos em no na para por que com não muito mas também como "
                  "mais meu minha sou está estou obrigado sim isso então são",
    "Dutch": "de het een en is ik je jij u wij we niet met op voor van dat die zijn ben maar ook heel wat hoe mijn "
             "jouw hebben heb graag dank ja nee er naar bij",
    "Swedish": "och är jag du vi en ett inte med på för till av det den som men också mycket vad hur min mitt din "
               "har ha tack ja nej om från kan vill",
    "Polish": "i w na jest nie się że to jak ja ty my jestem jesteś z do co mój moja bardzo ale też tak dziękuję czy "
              "dla od przez który być mam",
    "Turkish": "ve bir bu ben sen biz çok ne için ile da de değil var yok evet hayır teşekkür ederim nasıl gibi ama "
               "daha mi mı benim senin olarak her şey",
}
STOPWORDS: dict[str, frozenset[str]] = {lang: frozenset(words.split()) for lang, words in _STOPWORDS.items()}

# Letters that only one of the Latin-script languages above uses; each occurrence adds half a stopword hit.
_DISTINCT_LETTERS = {"Spanish": "ñ¿¡", "German": "ß", "Portuguese": "ãõ", "Polish": "łąęśźżćń", "Turkish": "ğşı",
                     "Swedish": "å", "French": "œêûî"}

# Unicode script (from the character name) -> language, for the non-Latin scripts.
_SCRIPT_LANGUAGE = {"CYRILLIC": "Russian", "GREEK": "Greek", "ARABIC": "Arabic", "HEBREW": "Hebrew",
                    "DEVANAGARI": "Hindi", "HANGUL": "Korean", "THAI": "Thai"}
SUPPORTED_LANGUAGES = tuple(STOPWORDS) + tuple(_SCRIPT_LANGUAGE.values()) + ("Chinese", "Japanese")
UNKNOWN_LANGUAGE = "unknown"

_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")


def _script(ch: str) -> str | None:
    name = unicodedata.name(ch, "")
    if not name:
        return None
    if name.startswith(("HIRAGANA", "KATAKANA")):
        return "KANA"
    if name.startswith("CJK"):
        return "HAN"
    first = name.split()[0]
    return first if first in _SCRIPT_LANGUAGE or first == "LATIN" else "OTHER"


def detect_language(text: str, min_score: float = 1.0) -> str:
    """Best-guess language of `text` (one of `SUPPORTED_LANGUAGES`), or "unknown".

    Non-Latin scripts decide by the majority script of the letters (kana present -> Japanese, Han only -> Chinese);
    Latin-script text is scored per language by its stopword hits plus half a point per language-specific letter,
    and needs at least `min_score` points. Meant for checking "answer in French"-style instructions on answers of a
    sentence or more, not for short or mixed-language strings.
    """
    scripts = Counter(s for ch in text if ch.isalpha() and (s := _script(ch)) is not None)
    if not scripts:
        return UNKNOWN_LANGUAGE
    if scripts["KANA"] or scripts["HAN"]:
        cjk = scripts["KANA"] + scripts["HAN"]
        if cjk * 2 >= sum(scripts.values()):
            return "Japanese" if scripts["KANA"] else "Chinese"
    script, count = scripts.most_common(1)[0]
    if script in _SCRIPT_LANGUAGE and count * 2 >= sum(scripts.values()):
        return _SCRIPT_LANGUAGE[script]
    lowered = text.lower().replace("\u2019", "'")
    words = _WORD.findall(lowered)
    scores = {lang: sum(w in stop for w in words) for lang, stop in STOPWORDS.items()}
    for lang, letters in _DISTINCT_LETTERS.items():
        scores[lang] += 0.5 * sum(lowered.count(c) for c in letters)
    best = max(scores, key=scores.get)
    return best if scores[best] >= min_score else UNKNOWN_LANGUAGE


def canonical_language(name: str) -> str:
    """The `SUPPORTED_LANGUAGES` spelling of a language name (case-insensitive); ValueError if not supported."""
    for lang in SUPPORTED_LANGUAGES:
        if lang.lower() == name.strip().lower():
            return lang
    raise ValueError(f"language {name!r} is not recognised by detect_language; supported: {SUPPORTED_LANGUAGES}")
