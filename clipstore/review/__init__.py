"""Human review by concept: sessions, assignments, grants (redeem), escalations.
(Enrolment, where a reviewer receives their factors, is `clipstore.enrolment`.)

Every state-changing call is one unit of work (see `clipstore.audit.log`); the
domain reaches storage only through the ports in `clipstore.review.ports`.
"""

from clipstore.review.desk import ReviewDesk
from clipstore.review.policy import ReviewPolicy
from clipstore.review.ports import ReviewPorts

__all__ = ["ReviewDesk", "ReviewPolicy", "ReviewPorts"]
