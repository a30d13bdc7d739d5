"""The scenes tokenizer covers every question and answer of every split, so no scenes word is ever <unk>."""

from __future__ import annotations

from msao.datasets.scenes import answer_vocabulary, load_scenes
from msao.export.builtin import PROMPT_TEMPLATE, tokenizer_for_easy_vqa, tokenizer_for_scenes


def test_every_scenes_question_and_answer_tokenizes_without_unknown_words():
    tok = tokenizer_for_scenes()
    unk = tok.token_to_id("<unk>")
    texts = set(answer_vocabulary())  # every possible answer, asked or not ("six" never is: too few visible objects)
    for split in ("train", "validation", "test"):
        data = load_scenes(split)
        texts |= {*data.questions, *data.answers}
    for text in texts:
        assert unk not in tok.encode(PROMPT_TEMPLATE.format(question=text)).ids, text


def test_multi_word_answers_are_several_ids_and_ids_are_fixed_by_the_word_list():
    tok = tokenizer_for_scenes()
    ids = tok.encode("small red triangle", add_special_tokens=False).ids
    assert len(ids) == 3 and len(set(ids)) == 3
    assert tokenizer_for_scenes().get_vocab() == tok.get_vocab()  # built from code, not from data
    assert tok.token_to_id("<image>") == tokenizer_for_easy_vqa().token_to_id("<image>")  # the special tokens come first in both
