// ThreadPool: coverage of parallel_for and run(), no deadlock over many short
// jobs, clean destruction.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <thread>
#include <vector>

#include "base/threads.h"

namespace kvq {
namespace {

TEST(ThreadPool, SizeIsAtLeastOne) {
  EXPECT_EQ(ThreadPool(0).size(), 1);
  EXPECT_EQ(ThreadPool(-3).size(), 1);
  EXPECT_EQ(ThreadPool(1).size(), 1);
  EXPECT_EQ(ThreadPool(3).size(), 3);
  EXPECT_GE(default_thread_count(), 1);
}

TEST(ThreadPool, ParallelForCoversRangeExactlyOnce) {
  for (int threads : {1, 2, 3, 4, 7}) {
    ThreadPool pool(threads);
    for (int64_t n : {0, 1, 2, 3, 5, 6, 7, 8, 63, 64, 65, 1000, 4099})
      for (int64_t grain : {1, 2, 3, 8, 64, 5000}) {
        SCOPED_TRACE("threads=" + std::to_string(threads) + " n=" + std::to_string(n) +
                     " grain=" + std::to_string(grain));
        std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
        std::atomic<int> calls{0};
        std::mutex mu;
        std::vector<std::pair<int64_t, int64_t>> chunks;
        pool.parallel_for(
            n,
            [&](int64_t b, int64_t e) {
              calls.fetch_add(1);
              {
                std::lock_guard<std::mutex> lock(mu);
                chunks.emplace_back(b, e);
              }
              for (int64_t i = b; i < e; ++i) hits[size_t(i)].fetch_add(1);
            },
            grain);
        for (int64_t i = 0; i < n; ++i) ASSERT_EQ(hits[size_t(i)].load(), 1) << "index " << i;
        // One non-empty chunk per participating thread at most; chunk starts
        // on grain boundaries.
        EXPECT_LE(calls.load(), threads);
        if (n > 0) {
          EXPECT_GE(calls.load(), 1);
        } else {
          EXPECT_EQ(calls.load(), 0);
        }
        for (auto [b, e] : chunks) {
          EXPECT_LT(b, e);
          EXPECT_EQ(b % grain, 0) << "chunk [" << b << "," << e << ")";
          EXPECT_TRUE(e == n || e % grain == 0) << "chunk [" << b << "," << e << ")";
        }
        // Work is actually spread when there is enough of it.
        const int64_t n_grains = (n + grain - 1) / grain;
        if (n_grains >= threads) {
          EXPECT_EQ(calls.load(), threads);
        }
      }
  }
}

TEST(ThreadPool, ParallelForNegativeCountDoesNothing) {
  ThreadPool pool(2);
  int calls = 0;
  pool.parallel_for(-5, [&](int64_t, int64_t) { ++calls; });
  EXPECT_EQ(calls, 0);
}

TEST(ThreadPool, RunGivesEachIndexOnce) {
  for (int threads : {1, 2, 3, 5}) {
    ThreadPool pool(threads);
    for (int rep = 0; rep < 50; ++rep) {
      std::vector<std::atomic<int>> seen(static_cast<size_t>(threads));
      std::atomic<int> bad_n{0};
      std::vector<std::thread::id> ids(static_cast<size_t>(threads));
      pool.run([&](int i, int n) {
        if (n != threads) bad_n.fetch_add(1);
        if (i >= 0 && i < threads) {
          seen[size_t(i)].fetch_add(1);
          ids[size_t(i)] = std::this_thread::get_id();
        }
      });
      EXPECT_EQ(bad_n.load(), 0);
      for (int i = 0; i < threads; ++i) ASSERT_EQ(seen[size_t(i)].load(), 1) << "index " << i << " rep " << rep;
      // The caller is index 0; the others are distinct threads.
      EXPECT_EQ(ids[0], std::this_thread::get_id());
      for (int i = 0; i < threads; ++i)
        for (int j = i + 1; j < threads; ++j) EXPECT_NE(ids[size_t(i)], ids[size_t(j)]);
    }
  }
}

// The job's effects are visible to the caller once run() returns.
TEST(ThreadPool, RunPublishesResults) {
  ThreadPool pool(3);
  std::vector<int64_t> out(3 * 1000);
  for (int rep = 0; rep < 200; ++rep) {
    pool.run([&](int i, int n) {
      for (int k = 0; k < 1000; ++k) out[size_t(i * 1000 + k)] = int64_t(rep) * 7 + i + k;
    });
    for (int i = 0; i < 3; ++i)
      for (int k = 0; k < 1000; k += 97) ASSERT_EQ(out[size_t(i * 1000 + k)], int64_t(rep) * 7 + i + k);
  }
}

TEST(ThreadPool, ManyTinyJobsDoNotDeadlock) {
  // 10000 back-to-back fork-joins (alternating run / parallel_for); a lost
  // wake-up or a miscounted join would hang or miscount here.
  ThreadPool pool(2);
  std::atomic<int64_t> total{0};
  for (int rep = 0; rep < 10000; ++rep) {
    if (rep % 2)
      pool.run([&](int, int) { total.fetch_add(1, std::memory_order_relaxed); });
    else
      pool.parallel_for(7, [&](int64_t b, int64_t e) { total.fetch_add(e - b, std::memory_order_relaxed); });
  }
  EXPECT_EQ(total.load(), 5000 * 2 + 5000 * 7);
  // More threads than this machine may have cores (workers get descheduled mid-spin).
  ThreadPool big(5);
  std::atomic<int64_t> n{0};
  for (int rep = 0; rep < 500; ++rep) big.run([&](int, int) { n.fetch_add(1, std::memory_order_relaxed); });
  EXPECT_EQ(n.load(), 500 * 5);
}

// Jobs separated by pauses long enough for workers to stop spinning and sleep:
// they must wake up for the next job.
TEST(ThreadPool, WakesSleepingWorkers) {
  ThreadPool pool(3);
  for (int rep = 0; rep < 5; ++rep) {
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    std::atomic<int> n{0};
    pool.run([&](int, int) { n.fetch_add(1); });
    EXPECT_EQ(n.load(), 3);
  }
}

TEST(ThreadPool, DestructionIsClean) {
  // Right after construction (workers may not have started yet).
  for (int i = 0; i < 20; ++i) {
    ThreadPool pool(3);
  }
  // After a job, while workers still spin.
  for (int i = 0; i < 20; ++i) {
    ThreadPool pool(3);
    pool.run([](int, int) {});
  }
  // While idle and asleep.
  {
    ThreadPool pool(4);
    pool.run([](int, int) {});
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  SUCCEED();
}

// Several pools may coexist and be used from different caller threads.
TEST(ThreadPool, IndependentPoolsOnDifferentCallers) {
  std::atomic<int64_t> sum{0};
  auto work = [&] {
    ThreadPool pool(2);
    for (int rep = 0; rep < 500; ++rep)
      pool.parallel_for(100, [&](int64_t b, int64_t e) { sum.fetch_add(e - b, std::memory_order_relaxed); });
  };
  std::thread a(work), b(work);
  a.join();
  b.join();
  EXPECT_EQ(sum.load(), 2 * 500 * 100);
}

}  // namespace
}  // namespace kvq
