// The check behind errors="raise": scipy's message for the first item that failed, as
// maskformer_fast/_ops.py words it (STATUS_MESSAGES), with the item's index. Host code.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>

#include "solver.h"

namespace maskformer_fast {

inline void raise_for_status(const int32_t* status, int64_t batch) {
  for (int64_t b = 0; b < batch; ++b) {
    if (status[b] == lsa::kOk) continue;
    const char* message = status[b] == lsa::kInfeasible ? "cost matrix is infeasible"
                          : status[b] == lsa::kInvalid  ? "matrix contains invalid numeric entries"
                                                        : "sizes lie outside the padded [N, M] problem";
    TORCH_CHECK_VALUE(false, message, " (batch item ", b, ")");
  }
}

}  // namespace maskformer_fast
