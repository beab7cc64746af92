"""`msun train` options of tiny runs (resnet18 on 32-px synthetic images) that take seconds."""

#: The network, data sizes and evaluation of a tiny run, without its length or learning rate.
MODEL = [
    "--model",
    "resnet18",
    "--image-size",
    "32",
    "--scales",
    "16",
    "32",
    "--batch-size",
    "8",
    "--num-val",
    "8",
    "--eval-sizes",
    "16,32",
]
#: A complete tiny run: 16 training images, one epoch.
TRAIN = [*MODEL, "--num-train", "16", "--epochs", "1"]
