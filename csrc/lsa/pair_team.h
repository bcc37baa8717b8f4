// PairTeam: two threads solve one problem together; the CPU path for a single wide
// problem when two threads are free.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>

#include "sequential_team.h"

namespace lsa {

// Each member runs the whole solver on a workspace of its own; only argmin (and the check
// of the entries) is shared: member 0 relaxes the columns [0, split), member 1
// [split, m), and the two swap their best keys, so that both pick the same column (the
// keys are totally ordered) and go on identically. The scalar work between relaxations
// (the scan list, the duals, the augmentation) is done twice: that costs less than
// handing its results over.
//
// One swap a step: a key written to a cache line of one's own, the other's read once it
// carries this step's number. Each member writes two such lines, by step parity, so that
// a key is never overwritten before the other has read it (a member cannot be two steps
// ahead). Both threads must run at once (the caller's OpenMP team does that); a member
// waits for the other spinning a while, then asleep on the step number.
//
// Two threads only pay while both cores are free: a member that waits for the other
// longer than it works (the other core busy elsewhere) votes to part, with its key. From
// the next Dijkstra on (only then is a member's workspace complete) member 0 goes on
// alone over every column, and member 1 stops (its argmin finds nothing: its solve ends
// as infeasible, a result nobody reads).
//
// alignas(64): the team's counters change every step; they get a cache line of their own.
class alignas(64) PairTeam : public SequentialTeam {
 public:
  struct Exchange {
    struct alignas(64) Slot {
      std::atomic<uint32_t> step{0};
      Key key;
      bool part;  // this member's vote to part
    };
    Slot slot[2][2];  // [member][step parity]
  };

  // For a problem of m columns; part_at: for tests, a step at which this member votes to
  // part whatever the times.
  PairTeam(Exchange& exchange, int member, int32_t m, uint32_t part_at = 0)
      : exchange_(exchange), member_(member), split_((m / 2 + 63) / 64 * 64), part_at_(part_at) {
    reserve(m);
  }

  template <class Relax>
  Key argmin(int32_t n, const Relax& relax, const double* val, const int32_t* rank) {
    if (relax.first && parting_) alone_ = true;
    if (alone_) return member_ == 0 ? argmin_range(0, n, relax, val, rank) : Key::none();
    const int32_t split = std::min(split_, n);
    const Key mine = member_ == 0 ? argmin_range(0, split, relax, val, rank)
                                  : argmin_range(split, n, relax, val, rank);
    return min_key(mine, swap(mine));
  }

  // Each member looks at its own columns (the solver asks before a Dijkstra: parting
  // starts there too).
  template <class Pred>
  bool any(int32_t rows, int32_t cols, Pred&& pred) {
    if (parting_) alone_ = true;
    if (alone_) return member_ == 0 && SequentialTeam::any(rows, cols, pred);
    const int32_t split = std::min(split_, cols), from = member_ == 0 ? 0 : split;
    const bool found = SequentialTeam::any(rows, member_ == 0 ? split : cols - split,
                                           [&](int32_t i, int32_t j) { return pred(i, from + j); });
    return swap(Key{double(found), 0, 0}).value != 0 || found;
  }

 private:
  // Hands this member's key to the other and returns the other's.
  const Key& swap(const Key& mine) {
    const int64_t arrived = ticks();
    work_ += arrived - left_;
    ++step_;
    auto& out = exchange_.slot[member_][step_ & 1];
    out.key = mine;
    out.part = (part_at_ != 0 && step_ == part_at_) || ((step_ & 255) == 0 && wait_ > work_);
    if ((step_ & 255) == 0) work_ = wait_ = 0;  // (votes over the last 256 steps)
    out.step.store(step_, std::memory_order_release);
    out.step.notify_one();
    const auto& in = exchange_.slot[1 - member_][step_ & 1];
    for (int spins = 0;;) {
      const uint32_t seen = in.step.load(std::memory_order_acquire);
      if (seen == step_) break;
      if (spins < 4096) {
        ++spins;
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
      } else {
        in.step.wait(seen, std::memory_order_acquire);
      }
    }
    parting_ = parting_ || out.part || in.part;
    left_ = ticks();
    wait_ += left_ - arrived;
    return in.key;
  }

  static int64_t ticks() {
#if defined(__x86_64__) || defined(__i386__)
    return int64_t(__builtin_ia32_rdtsc());
#else
    return std::chrono::steady_clock::now().time_since_epoch().count();
#endif
  }

  Exchange& exchange_;
  const int member_;
  const int32_t split_;  // on a group of 64 columns
  const uint32_t part_at_;
  uint32_t step_ = 0;
  int64_t left_ = ticks(), work_ = 0, wait_ = 0;  // when the last swap ended; since the last vote
  bool parting_ = false, alone_ = false;
};

}  // namespace lsa
