// The synchronous API (kiln::sandbox, snapshots, host functions) compiles without Asio: this
// file includes it first and fails to build if any Asio header came along. Asio is for the
// asynchronous runtime (kiln/runtime/runtime.hpp) and coroutine host functions
// (kiln/runtime/awaitable_host.hpp) only.
#include <kiln/runtime/host_function.hpp>
#include <kiln/runtime/sandbox.hpp>
#include <kiln/runtime/snapshot.hpp>

#ifdef BOOST_ASIO_DETAIL_CONFIG_HPP // every Asio header includes boost/asio/detail/config.hpp
#error "the synchronous API pulls in Asio"
#endif

#include <gtest/gtest.h>

#include <cstdint>
#include <system_error>

namespace {

TEST(SyncApi, IsUsableWithoutAsio) {
  kiln::host_functions fns;
  fns.add("add", [](std::int64_t a, std::int64_t b) { return a + b; });
  auto out = fns.invoke("add", std::vector<kiln::value>{std::int64_t{2}, std::int64_t{3}});
  EXPECT_EQ(out.status, KILN_STATUS_OK);
  EXPECT_EQ(std::get<std::int64_t>(out.result), 5);

  kiln::sandbox_config c;
  c.guest_path = "/nonexistent/guest.elf";
  c.backend = kiln::vcpu::backend_choice::emulated;
  auto sb = kiln::sandbox::create(c, fns);
  ASSERT_FALSE(sb);
  EXPECT_EQ(sb.err().code, std::errc::no_such_file_or_directory) << sb.err().message();
}

} // namespace
