"""The puzzle: the classic umigame "ウミガメのスープ". The question is public; the story is the secret.
More puzzles, with scripted questions and expected answers, are in scenarios.jsonl (`mlxq eval gm`)."""

from mlxq.eval.gm import SCHEMA, system_prompt  # noqa: F401  (SCHEMA: play.py reads it from here)

TITLE = "ウミガメのスープ"

QUESTION = (
    "ある男が、海の見えるレストランで「ウミガメのスープ」を注文した。"
    "一口飲んだ男はシェフに「これは本当にウミガメのスープですか？」と尋ねた。"
    "シェフが「はい、間違いなくウミガメのスープです」と答えると、男は店を出て、その夜、自ら命を絶った。"
    "なぜだろう？"
)

# The hidden story. Each sentence is guarded on its own, so a short key fact is protected as a whole.
STORY = [
    "男はかつて船の事故で仲間たちと無人島に漂着した。",
    "食料が尽き、仲間の一人が死んだ。",
    "生き残った仲間は男に「ウミガメのスープだ」と言ってスープを飲ませた。",
    "それは死んだ仲間の肉で作ったスープだった。",
    "本物のウミガメのスープを飲んで味が違うと知り、男は真実に気づいた。",
]

# The game master's instructions and answer schema are the ones `mlxq eval gm` scores models with.
SYSTEM = system_prompt(QUESTION, STORY, core="スープが仲間の肉だったと気づいた")

SCRIPT = [
    "男はスープの味に驚きましたか？",
    "男は以前にもウミガメのスープを飲んだことがありますか？",
    "シェフは嘘をついていますか？",
    "男は昔、遭難したことがありますか？",
    "男が昔飲んだスープは、仲間の肉でできていたのですか？",
]
