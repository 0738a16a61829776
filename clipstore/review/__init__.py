"""Human review by concept: sessions, assignments, grants (redeem), escalations, enrolment.

Every state-changing call is one unit of work (see `clipstore.audit.log`); the
domain reaches storage only through the ports in `clipstore.review.ports`.
"""

from clipstore.review.desk import ReviewDesk
from clipstore.review.enrolment import Enrolment
from clipstore.review.policy import ReviewPolicy
from clipstore.review.ports import ReviewPorts

__all__ = ["Enrolment", "ReviewDesk", "ReviewPolicy", "ReviewPorts"]
