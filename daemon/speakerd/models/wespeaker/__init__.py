"""WeSpeaker ResNet34: model, checkpoint loaders, bundle conversion and download.

Nothing heavy is imported here: ``speakerd run`` must never pull in torch. Import the submodules
(``resnet``, ``checkpoint``, ``convert``, ``fetch``) where they are needed.
"""
