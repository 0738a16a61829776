"""AccountService (roles ingest, admin): review preference, deletion, key rotation; access reports (ingest:
the account-facing backend asks on the account holder's behalf)."""

from __future__ import annotations

import grpc

from clipstore.access_reports import AccessReports
from clipstore.accounts import AccountDirectory
from clipstore.interceptors import current_actor
from clipstore.servicers.common import MAX_ID_CHARS, MAX_SHORT_CHARS, optional_instant, text
from clipstore.v1 import account_pb2, account_pb2_grpc


class AccountServicer(account_pb2_grpc.AccountServiceServicer):
    def __init__(self, accounts: AccountDirectory, reports: AccessReports) -> None:
        self._accounts = accounts
        self._reports = reports

    @staticmethod
    def _account_id(value: str) -> str:
        return text("account_id", value, max_chars=MAX_ID_CHARS, required=True)

    def SetReviewPreference(self, request: account_pb2.SetReviewPreferenceRequest,
                            context: grpc.ServicerContext) -> account_pb2.SetReviewPreferenceResponse:
        account, dequeued, revoked = self._accounts.set_review_preference(
            self._account_id(request.account_id), request.allow_human_review, current_actor())
        return account_pb2.SetReviewPreferenceResponse(allow_human_review=account.allow_review,
                                                       dequeued_clips=dequeued, revoked_grants=revoked)

    def DeleteAccount(self, request: account_pb2.DeleteAccountRequest,
                      context: grpc.ServicerContext) -> account_pb2.DeleteAccountResponse:
        deleted = self._accounts.delete_account(self._account_id(request.account_id), current_actor())
        return account_pb2.DeleteAccountResponse(deleted_clips=deleted)

    def RotateAccountKey(self, request: account_pb2.RotateAccountKeyRequest,
                         context: grpc.ServicerContext) -> account_pb2.RotateAccountKeyResponse:
        version, rewrapped, remaining = self._accounts.rotate_key(
            self._account_id(request.account_id), current_actor(), budget_s=context.time_remaining())
        return account_pb2.RotateAccountKeyResponse(active_key_version=version, rewrapped_clips=rewrapped,
                                                    remaining_clips=remaining)

    def GetAccessReport(self, request: account_pb2.GetAccessReportRequest,
                        context: grpc.ServicerContext) -> account_pb2.GetAccessReportResponse:
        since = optional_instant("since", request.HasField("since"), request.since)
        until = optional_instant("until", request.HasField("until"), request.until)
        report = self._reports.build(self._account_id(request.account_id), current_actor(), since=since, until=until,
                                     nonce=text("nonce", request.nonce, max_chars=MAX_SHORT_CHARS, required=False))
        return account_pb2.GetAccessReportResponse(report=report.report, tree_size=report.tree_size,
                                                   entries=report.entries)
