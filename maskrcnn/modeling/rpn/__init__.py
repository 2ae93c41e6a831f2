"""``RPN``: anchors, the shared conv head, proposal generation (decode, clip, NMS) and the RPN losses."""
from .anchors import AnchorGenerator
from .head import RPNHead
from .loss import rpn_losses
from .proposals import GenerateProposals, generate_proposals
from .rpn import RPN

__all__ = [
    "RPN",
    "RPNHead",
    "AnchorGenerator",
    "GenerateProposals",
    "generate_proposals",
    "rpn_losses",
]
