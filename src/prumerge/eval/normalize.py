"""EvalAI's answer normalisation, as LLaVA's TextVQA evaluator and lmms-eval use it.

Both VQA accuracy and exact match compare answers after :func:`normalize_answer`; the
tables and the order of the steps are the reference's, including its quirks (each is
noted where it is reproduced).
"""

from __future__ import annotations

import re

__all__ = ["ARTICLES", "CONTRACTIONS", "NUMBER_WORDS", "PUNCTUATION", "normalize_answer"]

# Canonical contracted form, then the spellings that map to it. This is the EvalAI table with
# three kinds of entries left out because they can never fire: keys with capitals ("Im",
# "Ive", "Id've", "I'dve") never match since the text is lowercased first, and identity
# entries ("let's", "she's") change nothing. One entry maps *away* from the apostrophe
# ("somebody'd" -> "somebodyd"); that is what the reference does, so it is kept.
_CONTRACTIONS_TABLE = """
ain't aint
aren't arent
can't cant
could've couldve
couldn't couldnt
couldn't've couldn'tve couldnt've
didn't didnt
doesn't doesnt
don't dont
hadn't hadnt
hadn't've hadnt've hadn'tve
hasn't hasnt
haven't havent
he'd hed
he'd've hed've he'dve
he's hes
how'd howd
how'll howll
how's hows
isn't isnt
it'd itd
it'd've itd've it'dve
it'll itll
ma'am maam
mightn't mightnt
mightn't've mightnt've mightn'tve
might've mightve
mustn't mustnt
must've mustve
needn't neednt
not've notve
o'clock oclock
oughtn't oughtnt
'ow's'at ow's'at 'ows'at 'ow'sat
shan't shant
she'd've shed've she'dve
should've shouldve
shouldn't shouldnt
shouldn't've shouldnt've shouldn'tve
somebodyd somebody'd
somebody'd've somebodyd've somebody'dve
somebody'll somebodyll
somebody's somebodys
someone'd someoned
someone'd've someoned've someone'dve
someone'll someonell
someone's someones
something'd somethingd
something'd've somethingd've something'dve
something'll somethingll
that's thats
there'd thered
there'd've thered've there'dve
there're therere
there's theres
they'd theyd
they'd've theyd've they'dve
they'll theyll
they're theyre
they've theyve
'twas twas
wasn't wasnt
we'd've wed've we'dve
we've weve
weren't werent
what'll whatll
what're whatre
what's whats
what've whatve
when's whens
where'd whered
where's wheres
where've whereve
who'd whod
who'd've whod've who'dve
who'll wholl
who's whos
who've whove
why'll whyll
why're whyre
why's whys
won't wont
would've wouldve
wouldn't wouldnt
wouldn't've wouldnt've wouldn'tve
y'all yall
y'all'll yall'll y'allll
y'all'd've yall'd've y'alld've y'all'dve
you'd youd
you'd've youd've you'dve
you'll youll
you're youre
you've youve
"""

CONTRACTIONS: dict[str, str] = {
    spelling: line.split()[0]
    for line in _CONTRACTIONS_TABLE.strip().splitlines()
    for spelling in line.split()[1:]
}

# "none" counts as zero in the reference too.
NUMBER_WORDS: dict[str, str] = {
    word: str(value)
    for value, word in enumerate(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    )
} | {"none": "0"}

ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# Characters that are deleted when they touch a space (or when the text holds a digit-comma-digit
# group), and otherwise replaced by a space. A period is not in the list; it has its own rule.
PUNCTUATION: tuple[str, ...] = tuple(';/[]"{}()=+\\_-><@`,?!')

# The reference writes this as "(?!<=\d)(\.)(?!\d)". The first group is a malformed lookbehind
# (a lookahead for the literal "<=" and a digit) that never blocks a match, so in effect a
# period is removed unless a digit follows it: "3." -> "3" but "2.5" stays. We reproduce the
# effect, not the intent.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d),+(?=\d)")


def _strip_punctuation(text: str) -> str:
    # The decision to delete or to space out a mark is made on the text as it was before any
    # mark was handled (the reference tests its input, not its running output).
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if delete_all or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    # The reference passes re.UNICODE (= 32) where `count` goes, so it removes at most 32
    # periods; no real answer has more, and we remove them all.
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _map_words(text: str) -> str:
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(text: str) -> str:
    """Normalise an answer the way EvalAI's VQA evaluation does.

    Steps, in the reference's order: lowercase; delete commas and question marks; split off
    a possessive ``'s`` as its own word; turn newlines and tabs into spaces; punctuation
    rules (see :data:`PUNCTUATION`); delete periods not followed by a digit; number words
    zero to ten (and "none") to digits; drop the articles a/an/the; expand contractions
    written without their apostrophe ("dont" -> "don't").

    Args:
        text: A predicted or reference answer.

    Returns:
        The normalised answer; words are separated by single spaces.

    Examples:
        >>> normalize_answer("Two dogs.")
        '2 dogs'
        >>> normalize_answer("The T-shirt!")
        't shirt'
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _map_words(_strip_punctuation(text))
