"""Prepare a tiny TFDS dataset, `var_jax_tiny`, without TensorFlow (array_record files), the way
ImageNet is prepared for training: `python tests/data/make_tiny_tfds.py DATA_DIR`.

Run as its own process, so that the tests read it as a prepared dataset whose builder class they
have never imported (as with imagenet2012 prepared on another machine). Splits: `train` 16 images
of 3 classes, 20x24 PNGs, with one undecodable record (index 5); `validation` 5 images.
"""
from __future__ import annotations

import io
import sys

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

CORRUPT = 5


class VarJaxTiny(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version('1.0.0')
    pkg_dir_path = epath.Path(__file__).parent  # a builder outside a package needs one

    def _info(self):
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'label': tfds.features.ClassLabel(names=['red', 'green', 'blue'])}))

    def _split_generators(self, dl_manager):
        return {'train': self._generate_examples(16, 0), 'validation': self._generate_examples(5, 1)}

    def _generate_examples(self, n, seed):
        rng = np.random.default_rng(seed)
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), np.uint8)).save(buf, format='PNG')
            data = b'\x89PNG\r\n\x1a\n truncated' if seed == 0 and i == CORRUPT else buf.getvalue()
            yield i, {'image': data, 'label': i % 3}


if __name__ == '__main__':
    builder = VarJaxTiny(data_dir=sys.argv[1], file_format='array_record')
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
