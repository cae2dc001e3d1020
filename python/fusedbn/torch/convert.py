"""convert(model): torchvision ResNets onto fusedbn's modules.

What is converted, in place (the model is returned):
  - every torchvision.models.resnet.BasicBlock and Bottleneck:
      the last batch norm (bn2, bn3) -> FusedBatchNorm2d: ReLU(BN(out) + identity),
      the inner ones (bn1; bn1 and bn2)  -> BatchNorm2dReLU,
      downsample's torch.nn.BatchNorm2d  -> fusedbn BatchNorm2d (BN alone),
    and the block's forward is replaced (an instance attribute) by one that
    calls conv1, bn1, conv2, bn2, (conv3, bn3,) downsample in torchvision's
    order and leaves out the block's relu, which the batch norms now apply;
  - the stem of a torchvision.models.ResNet: bn1 -> BatchNorm2dReLU and relu
    -> torch.nn.Identity (torchvision's ResNet applies self.relu only right
    after self.bn1).
Only these attribute names are relied on: conv1, bn1, relu, conv2, bn2,
conv3, bn3, downsample (a Sequential whose batch norm is found by type).
The new batch norms take over the old ones' tensors (the same weight and bias
Parameters, the same buffers) and mode, so an optimizer built before
convert() keeps working and state_dict() keys and values are unchanged.

convert(model, sync=True, process_group=None): the same with the
synchronized modules (fusedbn.torch.sync: SyncFusedBatchNorm2d,
SyncBatchNorm2dReLU, SyncBatchNorm2d over process_group), and besides every
other torch.nn.BatchNorm2d of the model (exactly that type, anywhere) ->
SyncBatchNorm2d and every unsynchronized fusedbn module (of an earlier
convert()) -> its synchronized form; names, tensors and mode kept the same
way.  A model that is itself such a batch norm is returned replaced.

Not converted: batch norms anywhere else (without sync: torchvision's other
models, a block whose bn is not exactly torch.nn.BatchNorm2d; with or
without: a subclass of it, or a SyncBatchNorm), a block whose relu is not
torch.nn.ReLU, forward hooks registered on the replaced batch norms or on a
block's relu (they are not carried over), and TorchScript (the replaced
forward is Python).
"""
import functools

import torch

from . import modules, sync as sync_modules


def _resnet_classes():
    try:
        from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
    except ImportError:
        return None
    return BasicBlock, Bottleneck, ResNet


def _is_plain_bn(m):
    return type(m) is torch.nn.BatchNorm2d


def _take_over(old, cls, process_group=None):
    """A cls with old's arguments holding old's very tensors and mode (and
    process_group for a synchronized cls)."""
    new = cls.__new__(cls)
    torch.nn.Module.__init__(new)
    new.num_features = old.num_features
    new.eps = old.eps
    new.momentum = old.momentum
    new.affine = old.affine
    new.track_running_stats = old.track_running_stats
    for name, p in old.named_parameters(recurse=False):
        new.register_parameter(name, p)
    if not old.affine:
        new.register_parameter("weight", None)
        new.register_parameter("bias", None)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        new.register_buffer(name, getattr(old, name, None))
    new.train(old.training)
    if issubclass(cls, sync_modules._SyncMixin):
        new.process_group = process_group
    return new


def _basic_block_forward(block, x):
    out = block.bn1(block.conv1(x))
    out = block.conv2(out)
    identity = x if block.downsample is None else block.downsample(x)
    return block.bn2(out, identity)


def _bottleneck_forward(block, x):
    out = block.bn1(block.conv1(x))
    out = block.bn2(block.conv2(out))
    out = block.conv3(out)
    identity = x if block.downsample is None else block.downsample(x)
    return block.bn3(out, identity)


class _Kinds:
    """The module classes convert() puts in, and their process group."""

    def __init__(self, sync, process_group):
        self.sync, self.process_group = sync, process_group
        if sync:
            self.bn_add_relu, self.bn_relu, self.bn = (sync_modules.SyncFusedBatchNorm2d,
                                                       sync_modules.SyncBatchNorm2dReLU,
                                                       sync_modules.SyncBatchNorm2d)
        else:
            self.bn_add_relu, self.bn_relu, self.bn = (modules.FusedBatchNorm2d,
                                                       modules.BatchNorm2dReLU,
                                                       modules.BatchNorm2d)

    def take_over(self, old, cls):
        return _take_over(old, cls, self.process_group)


def _convert_downsample(block, kinds):
    ds = block.downsample
    if isinstance(ds, torch.nn.Sequential):
        for name, m in ds.named_children():
            if _is_plain_bn(m):
                setattr(ds, name, kinds.take_over(m, kinds.bn))


def _convert_block(block, inner, last, forward, kinds):
    names = inner + (last,)
    if not all(_is_plain_bn(getattr(block, n, None)) for n in names):
        return False
    if type(getattr(block, "relu", None)) is not torch.nn.ReLU:
        return False
    for n in inner:
        setattr(block, n, kinds.take_over(getattr(block, n), kinds.bn_relu))
    setattr(block, last, kinds.take_over(getattr(block, last), kinds.bn_add_relu))
    _convert_downsample(block, kinds)
    # An instance attribute shadows the class's forward; functools.partial
    # of a module-level function keeps the model picklable and deep-copyable.
    block.forward = functools.partial(forward, block)
    return True


def _sync_class_of(m):
    """The synchronized module that replaces m under convert(sync=True), or None."""
    if _is_plain_bn(m):
        return sync_modules.SyncBatchNorm2d
    return sync_modules.SYNC_OF.get(type(m))


def _convert_to_sync(model, kinds):
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            cls = _sync_class_of(child)
            if cls is not None:
                setattr(parent, name, kinds.take_over(child, cls))
    cls = _sync_class_of(model)
    return model if cls is None else kinds.take_over(model, cls)


def convert(model, sync=False, process_group=None):
    """Run the batch norms of torchvision ResNet blocks (and the stem's
    bn1 + relu) through fusedbn; returns model, changed in place.  sync=True
    puts in the synchronized modules over process_group (None: the default
    group) and converts every other batch norm too.  See the module
    docstring for what is and is not converted."""
    kinds = _Kinds(bool(sync), process_group)
    classes = _resnet_classes()
    if classes is None:
        if not sync:
            raise ImportError("fusedbn.torch.convert needs torchvision (its ResNet block "
                              "classes)")
        return _convert_to_sync(model, kinds)
    basic, bottleneck, resnet = classes
    for m in list(model.modules()):
        if isinstance(m, basic):
            _convert_block(m, ("bn1",), "bn2", _basic_block_forward, kinds)
        elif isinstance(m, bottleneck):
            _convert_block(m, ("bn1", "bn2"), "bn3", _bottleneck_forward, kinds)
        elif (isinstance(m, resnet) and _is_plain_bn(getattr(m, "bn1", None))
              and type(getattr(m, "relu", None)) is torch.nn.ReLU):
            m.bn1 = kinds.take_over(m.bn1, kinds.bn_relu)
            m.relu = torch.nn.Identity()
    if sync:
        return _convert_to_sync(model, kinds)
    return model
