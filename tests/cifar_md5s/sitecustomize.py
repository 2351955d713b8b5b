"""For a test's subprocesses only (tests/cifar_fixture.py puts this folder on PYTHONPATH):
when torchvision's CIFAR-10 module is imported, its lists of official md5 sums are replaced
by those of the test's files, named in $TESTS_CIFAR10_MD5S. Everything else of torchvision
(its integrity check, its parsing) runs as it does for a user; torchvision is not imported
any earlier than the process itself imports it."""

import importlib.abc
import importlib.util
import json
import os
import sys

MODULE = "torchvision.datasets.cifar"


class _PointCifarMd5sAtTestFiles(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != MODULE:
            return None
        sys.meta_path.remove(self)  # once: the spec below comes from the ordinary finders
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            md5s = json.loads(os.environ["TESTS_CIFAR10_MD5S"])
            module.CIFAR10.train_list, module.CIFAR10.test_list = md5s["train"], md5s["test"]
            module.CIFAR10.meta = {**module.CIFAR10.meta, "md5": md5s["meta"]}

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get("TESTS_CIFAR10_MD5S"):
    sys.meta_path.insert(0, _PointCifarMd5sAtTestFiles())
