"""The puzzle: the classic umigame "ウミガメのスープ". The question is public; the story is the secret."""

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

SYSTEM = f"""あなたは水平思考パズル（ウミガメのスープ）のゲームマスターです。

問題: {QUESTION}

真相（プレイヤーには絶対に教えないこと）: {"".join(STORY)}

プレイヤーの質問に、真相に照らして答えてください。
- answer: "yes"（はい）、"no"（いいえ）、"irrelevant"（関係ありません）のどれか
- solved: プレイヤーが真相の核心（スープが仲間の肉だったと気づいた）を言い当てたら true
- comment: 短い日本語のひとこと。真相の文章をそのまま書かないこと。
"""

SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"enum": ["yes", "no", "irrelevant"]},
        "solved": {"type": "boolean"},
        "comment": {"type": "string", "maxLength": 60},
    },
    "required": ["answer", "solved", "comment"],
    "additionalProperties": False,
}

SCRIPT = [
    "男はスープの味に驚きましたか？",
    "男は以前にもウミガメのスープを飲んだことがありますか？",
    "シェフは嘘をついていますか？",
    "男は昔、遭難したことがありますか？",
    "男が昔飲んだスープは、仲間の肉でできていたのですか？",
]
