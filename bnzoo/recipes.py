"""The Batch Normalization paper's training recipes: Inception's schedule (section 4.2) and
section 4.2.1's "Accelerating BN networks", as option values for `train.py --recipe NAME`.

Three recipes, named after the paper's runs (Figure 3):

- `paper_baseline`: how the paper trained Inception. With `--normalization none` it is the
  paper's *Inception*, with BN (the default) its *BN-Baseline*: "Same as Inception with Batch
  Normalization before each nonlinearity".
- `paper_bn_accelerated_x5` and `paper_bn_accelerated_x30`: *BN-x5* and *BN-x30*, the
  baseline with each change of section 4.2.1 applied, at 5 and 30 times Inception's rate.
  *BN-x5-Sigmoid* is the first with `--model-arg activation=sigmoid`.

Each change of section 4.2.1 is one `Change` below: the paper's words, the option values that
make it, and what it amounts to here. A change is switched off by setting its options back to
the baseline's on the command line (`--recipe paper_bn_accelerated_x5 --model-arg lrn=true`
puts LRN back); docs/training.md#recipes tabulates them (`recipes_table`, kept equal by a
test). `train.py` registers the recipes (`bnzoo.config.register_recipe`) and the experiments
read the same values through `TrainConfig(recipe=...)`, so no number here is written twice.

Where the numbers come from, since the paper gives only some of them:

- The BN paper (Ioffe & Szegedy 2015, arXiv:1502.03167), section 4.2: "Stochastic Gradient
  Descent with momentum ... mini-batch size of 32"; Figure 3: initial rates 0.0015 (Inception),
  0.0075 (BN-x5), 0.045 (BN-x30); section 4.2.1: the changes quoted below.
- GoogLeNet (Szegedy et al. 2014, arXiv:1409.4842), section 6: "0.9 momentum, fixed learning
  rate schedule (decreasing the learning rate by 4% every 8 epochs)"; Table 1: 40% dropout
  before the classifier; Figure 3: LRN after the stem's first pool and second convolution.
- Inception's L2 weight is in neither paper. Caffe's replication of GoogLeNet's training, made
  with Szegedy's help (BVLC/caffe, models/bvlc_googlenet/solver.prototxt), uses
  `weight_decay: 0.0002` with that same schedule (`gamma: 0.96` every 320,000 iterations of
  32 images: 8 epochs) and momentum 0.9; it is used here. Divided by 5 it gives 4e-5, the L2
  weight of TF-slim's `inception_v2`, Google's own BN-Inception.

No TensorFlow here, and nothing from the rest of bnzoo: `bnzoo.config` imports this module to
register the recipes.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

#: Figure 3's initial learning rates, at mini-batches of 32: Inception's and BN-x5's, BN-x30's.
INCEPTION_LEARNING_RATE = 0.0015
FIGURE_3_LEARNING_RATES = {1: 0.0015, 5: 0.0075, 30: 0.045}

#: GoogLeNet's staircase: 4% less every 8 epochs.
INCEPTION_DECAY_RATE = 0.96
INCEPTION_DECAY_EPOCHS = 8.0

#: Inception's L2 weight (Caffe's bvlc_googlenet solver; see the module docstring).
INCEPTION_L2_WEIGHT = 2e-4

#: A shuffle buffer at least as large as any split: `bnzoo.data` caps the buffer at the split's
#: size, where it is a uniform shuffle of the whole training set every epoch.
WHOLE_SPLIT = 2**31 - 1

#: How the paper trained Inception (and BN-Baseline), as `TrainConfig` option values.
BASELINE: dict[str, Any] = {
    "model": "bn_inception",
    "batch_size": 32,
    "optimizer": "sgd",
    "momentum": 0.9,
    "lr": INCEPTION_LEARNING_RATE,
    "warmup_epochs": 0.0,  # neither paper warms up
    "lr_schedule": "exponential",
    "lr_decay_rate": INCEPTION_DECAY_RATE,
    "lr_decay_epochs": INCEPTION_DECAY_EPOCHS,
    "weight_decay": INCEPTION_L2_WEIGHT,
    "weight_decay_form": "l2",
    # bnzoo's default buffer: a partial shuffle, as Inception's was ("within-shard shuffling"
    # was only enabled for the BN networks).
    "shuffle_buffer": 10_000,
    "model_args": {"dropout_rate": 0.4, "lrn": True},
}


@dataclasses.dataclass(frozen=True)
class Change:
    """One change of section 4.2.1 ("Accelerating BN networks").

    Attributes:
        title: the paper's heading for it.
        paper: the paper's words.
        values: the option values that make the change (`model_args` keys merge with the
            baseline's); empty where no option is involved or, for the learning rate, where
            each recipe sets its own.
        here: what the change amounts to in bnzoo.
        options: the options it concerns, when not the keys of `values`.
    """

    title: str
    paper: str
    values: Mapping[str, Any]
    here: str
    options: tuple[str, ...] = ()

    def concerns(self) -> tuple[str, ...]:
        """The options this change sets (`model_args` keys as `model_args.KEY`)."""
        if self.options:
            return self.options
        names = []
        for key, value in self.values.items():
            names += [f"model_args.{name}" for name in value] if key == "model_args" else [key]
        return tuple(names)


ACCELERATING_CHANGES: tuple[Change, ...] = (
    Change(
        "Increase learning rate",
        "In a batch-normalized model, we have been able to achieve a training speedup from "
        "higher learning rates, with no ill side effects (Sec. 3.3).",
        {},  # the rate is each recipe's own: 5 or 30 times Inception's
        "--lr 0.0075 (x5) or 0.045 (x30), Figure 3's rates",
        options=("lr",),
    ),
    Change(
        "Remove Dropout",
        "As described in Sec. 3.4, Batch Normalization fulfills some of the same goals as "
        "Dropout. Removing Dropout from Modified BN-Inception speeds up training, without "
        "increasing overfitting.",
        {"model_args": {"dropout_rate": 0.0}},
        "the builder's dropout before the classifier, 40% (GoogLeNet's) -> 0",
    ),
    Change(
        "Reduce the L2 weight regularization",
        "While in Inception an L2 loss on the model parameters controls overfitting, in "
        "Modified BN-Inception the weight of this loss is reduced by a factor of 5. We find "
        "that this improves the accuracy on the held-out validation data.",
        {"weight_decay": round(INCEPTION_L2_WEIGHT / 5, 12)},
        "--weight-decay 2e-4 -> 4e-5, as the L2 loss (--weight-decay-form l2)",
    ),
    Change(
        "Accelerate the learning rate decay",
        "In training Inception, learning rate was decayed exponentially. Because our network "
        "trains faster than Inception, we lower the learning rate 6 times faster.",
        {"lr_decay_epochs": INCEPTION_DECAY_EPOCHS / 6},
        "4% less every 8/6 epochs instead of every 8 (--lr-decay-epochs)",
    ),
    Change(
        "Remove Local Response Normalization",
        "While Inception and other networks (Srivastava et al., 2014) benefit from it, we found "
        "that with Batch Normalization it is not necessary.",
        {"model_args": {"lrn": False}},
        "the builder's LRN after the stem's first pool and second convolution, on -> off",
    ),
    Change(
        "Shuffle training examples more thoroughly",
        "We enabled within-shard shuffling of the training data, which prevents the same "
        "examples from always appearing in a mini-batch together. This led to about 1% "
        "improvements in the validation accuracy, which is consistent with the view of Batch "
        "Normalization as a regularizer (Sec. 3.4): the randomization inherent in our method "
        "should be most beneficial when it affects an example differently each time it is "
        "seen.",
        {"shuffle_buffer": WHOLE_SPLIT},
        "--shuffle-buffer 10,000 (bnzoo's default) -> the whole training split; a dataset "
        "stored in random order (Fashion-MNIST) is mixed well by either",
    ),
    Change(
        "Reduce the photometric distortions",
        "Because batch-normalized networks train faster and observe each training example "
        "fewer times, we let the trainer focus on more \u201creal\u201d images by distorting them "
        "less.",
        {},
        "nothing to reduce: bnzoo has no photometric distortions (--augment's crops and "
        "flips are geometric, which the paper keeps), and neither recipe sets --augment",
    ),
)


def accelerated(
    multiplier: int, changes: Sequence[Change] = ACCELERATING_CHANGES
) -> dict[str, Any]:
    """The baseline's option values with `changes` applied, at `multiplier` times Inception's
    learning rate (Figure 3's rates: 5 gives BN-x5's 0.0075, 30 BN-x30's 0.045).

    Leaving a change out of `changes` keeps the baseline's values for it (the learning rate
    is the multiplier's either way).
    """
    values = copy.deepcopy(BASELINE)
    values["lr"] = FIGURE_3_LEARNING_RATES.get(multiplier, INCEPTION_LEARNING_RATE * multiplier)
    for change in changes:
        for key, value in change.values.items():
            if key == "model_args":
                values["model_args"] = {**values["model_args"], **value}
            else:
                values[key] = value
    return values


def switched_off(title: str) -> dict[str, Any]:
    """The option values that switch the change `title` off in an accelerated recipe: the
    baseline's values for what it sets (`model_args` as the keys to merge). The learning rate's
    change has none: it is the recipe's own (5x or 30x)."""
    change = next((c for c in ACCELERATING_CHANGES if c.title == title), None)
    if change is None:
        titles = ", ".join(repr(c.title) for c in ACCELERATING_CHANGES)
        raise ValueError(f"No change of section 4.2.1 is called {title!r}; the changes: {titles}.")
    values: dict[str, Any] = {}
    for key, value in change.values.items():
        if key == "model_args":
            values["model_args"] = {name: BASELINE["model_args"][name] for name in value}
        else:
            values[key] = BASELINE[key]
    return values


#: name -> (description, option values), registered by `bnzoo.config` for `--recipe NAME`.
PAPER_RECIPES: dict[str, tuple[str, dict[str, Any]]] = {
    "paper_baseline": (
        "how the BN paper trained Inception (section 4.2, GoogLeNet's schedule): bn_inception "
        "with LRN and 40% dropout, SGD with momentum 0.9 on batches of 32 at 0.0015, 4% less "
        "every 8 epochs, L2 weight 2e-4. With --normalization none the paper's Inception, "
        "with BN its BN-Baseline",
        BASELINE,
    ),
    "paper_bn_accelerated_x5": (
        "the paper's BN-x5: paper_baseline with every change of section 4.2.1 (no dropout, "
        "L2 weight / 5, 6x faster decay, no LRN, the whole split shuffled) at 5x the rate, "
        "0.0075; with --model-arg activation=sigmoid its BN-x5-Sigmoid",
        accelerated(5),
    ),
    "paper_bn_accelerated_x30": (
        "the paper's BN-x30: as paper_bn_accelerated_x5 at 30x Inception's rate, 0.045",
        accelerated(30),
    ),
}


def recipe_flags(values: Mapping[str, Any]) -> list[str]:
    """A recipe's option values as the command-line flags that would set them."""
    flags = []
    for key, value in values.items():
        if key == "model_args":
            flags += [f"--model-arg {name}={item!r}" for name, item in value.items()]
        else:
            flags.append(f"--{key.replace('_', '-')} {_shown(value)}")
    return flags


def _shown(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _option_value(values: Mapping[str, Any], option: str) -> str:
    if option.startswith("model_args."):
        key = option.split(".", 1)[1]
        return f"`{key}={values['model_args'][key]!r}`"
    return f"`{option}={_shown(values[option])}`"


def recipes_table(changes: Sequence[Change] = ACCELERATING_CHANGES) -> str:
    """Section 4.2.1 as a Markdown table: each change, the paper's words, and the options that
    make it in `paper_baseline` and in the accelerated recipes (docs/training.md#recipes)."""
    rows = [
        "| change (section 4.2.1) | the paper's words | `paper_baseline` | "
        "`paper_bn_accelerated_x5` / `_x30` | here |",
        "| --- | --- | --- | --- | --- |",
    ]
    five, thirty = accelerated(5), accelerated(30)
    for change in changes:
        baseline, faster = [], []
        for option in change.concerns():
            baseline.append(_option_value(BASELINE, option))
            at_five, at_thirty = _option_value(five, option), _option_value(thirty, option)
            faster.append(at_five if at_five == at_thirty else f"{at_five} / {at_thirty}")
        paper = change.paper.replace("|", "\\|")
        rows.append(
            f"| {change.title} | \u201c{paper}\u201d | {', '.join(baseline) or '-'} | "
            f"{', '.join(faster) or '-'} | {change.here} |"
        )
    return "\n".join(rows)
