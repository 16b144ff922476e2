"""Image search over the digits images: an index built by a keel workflow, served as
a search pipeline.

    python examples/image_search.py        # or: keel run examples/image_search.py:build_index
    keel serve examples/image_search.py:search --ephemeral --port 8081
    curl -s localhost:8081/run -H 'content-type: application/json' \\
        -d "{\\"image\\": $(python examples/image_search.py --image 42), \\"k\\": 3}"

`build_index` loads the 1,797 8x8 digits images, fits a PCA embedding and a
nearest-neighbours index over the embedded images (scikit-learn), and registers the
two together with the images' labels as a version of the model `digits-search` (the
pyfunc flavor: a `DigitIndex` object), with the alias `champion`. Each of those is a
durable step, so a crash resumes where it stopped.

`search` is the pipeline a request runs: preprocess (64 pixel values, 0 to 16) ->
embed (the champion's PCA) -> neighbours (its index) -> labels. It answers the ids of
the `k` nearest images, their distances and labels, and the model version that
answered.
Served with `--ephemeral` its steps run in memory with nothing recorded; without it
every request is a durable run. The model is loaded once per process and follows the
alias: run `build_index` again with other settings and the server answers from the
new version within seconds, without a restart.
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import numpy as np
from pydantic import Field
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors

import keel

MODEL_NAME = "digits-search"
ALIAS = "champion"
MODEL_URI = f"models:/{MODEL_NAME}@{ALIAS}"
PIXELS = 64

# What a request sends: one image as 64 numbers (validated before the run starts).
Pixel = Annotated[float, Field(ge=0, le=16)]
Image = Annotated[list[Pixel], Field(min_length=PIXELS, max_length=PIXELS)]


class DigitIndex:
    """An embedding (PCA), a nearest-neighbours index over the embedded images, and
    the images' labels. `predict` gives the nearest image's id per row."""

    def __init__(self, pca: PCA, index: NearestNeighbors, labels: np.ndarray) -> None:
        self.pca = pca
        self.index = index
        self.labels = labels

    def embed(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.pca.transform(images))

    def nearest(self, embedded: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        distances, ids = self.index.kneighbors(embedded, n_neighbors=k)
        return distances, ids

    def predict(self, images: Any) -> np.ndarray:
        return self.nearest(self.embed(np.asarray(images, dtype=float)), 1)[1][:, 0]


# -- building the index ----------------------------------------------------------------


@keel.task
def load_images() -> dict[str, np.ndarray]:
    digits = load_digits()
    return {"images": digits.data, "labels": digits.target}


@keel.task
def fit_embedding(images: np.ndarray, n_components: int) -> PCA:
    return PCA(n_components=n_components, random_state=0).fit(images)


@keel.task
def fit_index(pca: PCA, images: np.ndarray) -> NearestNeighbors:
    return NearestNeighbors().fit(pca.transform(images))


@keel.task
def register(pca: PCA, index: NearestNeighbors, labels: np.ndarray) -> int:
    version = keel.register_model(
        MODEL_NAME,
        DigitIndex(pca, index, labels),
        flavor="pyfunc",
        description="PCA embedding + nearest neighbours over the digits images",
    )
    keel.models.set_alias(MODEL_NAME, ALIAS, version.version)
    return version.version


@keel.workflow
def build_index(n_components: int = 16) -> dict[str, int]:
    """Embed every digits image, index the embeddings, register the index as champion."""
    data = load_images()
    pca = fit_embedding.submit(data["images"], n_components)
    index = fit_index.submit(pca, data["images"])
    version = register(pca, index, data["labels"])
    return {"version": version, "images": len(data["images"])}


# -- the search pipeline -----------------------------------------------------------------


def _model() -> DigitIndex:
    # Served, this is answered from the process's model cache, which follows the alias.
    index: DigitIndex = keel.load_model(MODEL_URI).unwrap()
    return index


def _version() -> str:
    return keel.load_model(MODEL_URI).uri  # served: the version the alias resolved to


@keel.task
def preprocess(image: list[float]) -> np.ndarray:
    return np.asarray(image, dtype=float).reshape(1, PIXELS)


@keel.task
def embed(pixels: np.ndarray) -> np.ndarray:
    return _model().embed(pixels)


@keel.task
def neighbours(embedded: np.ndarray, k: int) -> dict[str, list[Any]]:
    distances, ids = _model().nearest(embedded, k)
    return {"ids": ids[0].tolist(), "distances": np.round(distances[0], 6).tolist()}


@keel.task
def labels(found: dict[str, list[Any]]) -> dict[str, list[Any]]:
    known = _model().labels
    return {**found, "labels": [int(known[i]) for i in found["ids"]], "model": _version()}


@keel.workflow
def search(image: Image, k: Annotated[int, Field(ge=1, le=50)] = 5) -> dict[str, Any]:
    """The ids, distances and labels of the k images nearest to `image`."""
    return labels(neighbours(embed(preprocess(image)), k))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--image"]:  # print one digits image as JSON, for curl
        print(json.dumps(load_digits().data[int(sys.argv[2])].tolist()))
        sys.exit(0)
    handle = keel.run(build_index)
    print(f"run {handle.id}: {handle.status}; {handle.result()}")
    result = keel.run(search, image=load_digits().data[42].tolist(), k=3).result()
    print(f"nearest to image 42: {result}")
