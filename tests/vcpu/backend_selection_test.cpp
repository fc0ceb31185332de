// Tests for vcpu/vcpu.hpp's backend naming, probing and selection (KILN_BACKEND), and exit names.
#include <kiln/vcpu/vcpu.hpp>
#include <kiln/vcpu/vcpu_errc.hpp>

#include <gtest/gtest.h>

#include <cstdlib>
#include <optional>
#include <string>

#include <unistd.h>

namespace kiln::vcpu {
namespace {

/// Sets (or, with nullopt, unsets) an environment variable for one scope, then restores it.
class scoped_env {
public:
  scoped_env(const char* name, std::optional<std::string> value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    if (value)
      ::setenv(name, value->c_str(), 1);
    else
      ::unsetenv(name);
  }
  ~scoped_env() {
    if (old_)
      ::setenv(name_, old_->c_str(), 1);
    else
      ::unsetenv(name_);
  }
  scoped_env(const scoped_env&) = delete;
  scoped_env& operator=(const scoped_env&) = delete;

private:
  const char* name_;
  std::optional<std::string> old_;
};

bool kvm_usable() {
  return probe(backend_kind::kvm).usable;
}

// ---- names -----------------------------------------------------------------------------------

TEST(backend_selection, parse_accepts_every_documented_name) {
  struct {
    const char* name;
    backend_choice want;
  } const cases[] = {
      {"auto", backend_choice::automatic},    {"automatic", backend_choice::automatic},
      {"", backend_choice::automatic},        {"kvm", backend_choice::kvm},
      {"emulated", backend_choice::emulated}, {"unicorn", backend_choice::emulated},
  };
  for (const auto& c : cases) {
    auto r = parse_backend_choice(c.name);
    ASSERT_TRUE(r) << '"' << c.name << "\": " << r.err().message();
    EXPECT_EQ(*r, c.want) << '"' << c.name << '"';
  }
}

TEST(backend_selection, parse_refuses_other_names_with_a_typed_error) {
  for (const char* bad : {"bogus", "KVM", "Emulated", "kvm ", " auto", "qemu", "kvm,emulated"}) {
    auto r = parse_backend_choice(bad);
    ASSERT_FALSE(r) << '"' << bad << '"';
    EXPECT_EQ(r.code(), vcpu_errc::unknown_backend) << '"' << bad << '"';
    EXPECT_NE(r.err().detail.find(bad), std::string::npos) << r.err().detail;
    EXPECT_NE(r.err().detail.find("expected auto, kvm or emulated"), std::string::npos);
  }
}

TEST(backend_selection, backend_kinds_have_names) {
  EXPECT_STREQ(to_string(backend_kind::kvm), "kvm");
  EXPECT_STREQ(to_string(backend_kind::emulated), "emulated");
}

TEST(backend_selection, every_exit_alternative_has_its_own_name) {
  const exit all[] = {
      exits::io_out{0x10, 4, 7},
      exits::io_in{0x10, 1},
      exits::halt{0x1000},
      exits::mmio{0xfee00000, 4, true},
      exits::exception{14, 2, 0x1000, 0xdead},
      exits::memory_fault{0x3000, access_kind::write, false, 0x1000},
      exits::backing_lost{0x5000, true, false, 0x1000},
      exits::shutdown{0x1000},
      exits::fail_entry{0x80000021},
      exits::cancelled{},
      exits::internal_error{"boom", 0x1000},
  };
  static_assert(std::size(all) == std::variant_size_v<exit>, "one case per alternative");
  const char* const want[] = {"io_out",     "io_in",        "halt",          "mmio",
                              "exception",  "memory_fault", "backing_lost",  "shutdown",
                              "fail_entry", "cancelled",    "internal_error"};
  for (std::size_t i = 0; i < std::size(all); ++i) {
    EXPECT_EQ(all[i].index(), i);
    EXPECT_STREQ(exit_name(all[i]), want[i]);
  }
}

// ---- probing ---------------------------------------------------------------------------------

TEST(backend_selection, emulated_backend_is_usable_and_names_its_engine) {
  const auto st = probe(backend_kind::emulated);
  EXPECT_EQ(st.kind, backend_kind::emulated);
  ASSERT_TRUE(st.usable) << st.reason;
  EXPECT_NE(st.reason.find("Unicorn"), std::string::npos) << st.reason;
}

TEST(backend_selection, kvm_probe_names_dev_kvm_when_unusable) {
  const auto st = probe(backend_kind::kvm);
  EXPECT_EQ(st.kind, backend_kind::kvm);
  if (::access("/dev/kvm", F_OK) == 0)
    GTEST_SKIP() << "/dev/kvm exists here (usable: " << st.usable << ", " << st.reason << ")";
  EXPECT_FALSE(st.usable);
  EXPECT_NE(st.reason.find("/dev/kvm"), std::string::npos) << st.reason;
}

// ---- resolve() and KILN_BACKEND ----------------------------------------------------------------

TEST(backend_selection, automatic_without_override_prefers_kvm_else_emulated) {
  scoped_env env("KILN_BACKEND", std::nullopt);
  auto r = resolve(backend_choice::automatic);
  ASSERT_TRUE(r) << r.err().message();
  EXPECT_EQ(*r, kvm_usable() ? backend_kind::kvm : backend_kind::emulated);
}

TEST(backend_selection, empty_override_counts_as_none) {
  scoped_env env("KILN_BACKEND", "");
  auto r = resolve(backend_choice::automatic);
  ASSERT_TRUE(r) << r.err().message();
  EXPECT_EQ(*r, kvm_usable() ? backend_kind::kvm : backend_kind::emulated);
}

TEST(backend_selection, override_emulated_picks_emulated_even_where_kvm_works) {
  scoped_env env("KILN_BACKEND", "emulated");
  auto r = resolve(backend_choice::automatic);
  ASSERT_TRUE(r) << r.err().message();
  EXPECT_EQ(*r, backend_kind::emulated);
}

TEST(backend_selection, override_auto_is_automatic) {
  scoped_env env("KILN_BACKEND", "auto");
  auto r = resolve(backend_choice::automatic);
  ASSERT_TRUE(r) << r.err().message();
  EXPECT_EQ(*r, kvm_usable() ? backend_kind::kvm : backend_kind::emulated);
}

TEST(backend_selection, override_kvm_requires_kvm_and_never_falls_back) {
  scoped_env env("KILN_BACKEND", "kvm");
  auto r = resolve(backend_choice::automatic);
  if (kvm_usable()) {
    ASSERT_TRUE(r) << r.err().message();
    EXPECT_EQ(*r, backend_kind::kvm);
    return;
  }
  ASSERT_FALSE(r) << "resolved to " << to_string(*r);
  EXPECT_EQ(r.code(), vcpu_errc::backend_unavailable);
  EXPECT_EQ(r.err().detail.rfind("kvm: ", 0), 0u) << r.err().detail;
  EXPECT_NE(r.err().detail.find("/dev/kvm"), std::string::npos) << r.err().detail;
}

TEST(backend_selection, garbage_override_is_an_unknown_backend_error) {
  scoped_env env("KILN_BACKEND", "garbage");
  auto r = resolve(backend_choice::automatic);
  ASSERT_FALSE(r) << "resolved to " << to_string(*r);
  EXPECT_EQ(r.code(), vcpu_errc::unknown_backend);
  EXPECT_NE(r.err().detail.find("garbage"), std::string::npos) << r.err().detail;
}

TEST(backend_selection, override_applies_only_to_automatic) {
  {
    scoped_env env("KILN_BACKEND", "kvm");
    auto r = resolve(backend_choice::emulated);
    ASSERT_TRUE(r) << r.err().message();
    EXPECT_EQ(*r, backend_kind::emulated);
  }
  {
    scoped_env env("KILN_BACKEND", "garbage");
    auto r = resolve(backend_choice::emulated);
    ASSERT_TRUE(r) << r.err().message();
    EXPECT_EQ(*r, backend_kind::emulated);
  }
  {
    scoped_env env("KILN_BACKEND", "emulated");
    auto r = resolve(backend_choice::kvm);
    EXPECT_EQ(r.has_value(), kvm_usable());
    if (!r) {
      EXPECT_EQ(r.code(), vcpu_errc::backend_unavailable);
    }
  }
}

// ---- create() ----------------------------------------------------------------------------------

TEST(backend_selection, create_emulated_gives_an_emulated_vcpu) {
  auto v = create(backend_kind::emulated);
  ASSERT_TRUE(v) << v.err().message();
  EXPECT_EQ((*v)->kind(), backend_kind::emulated);
}

TEST(backend_selection, create_kvm_fails_cleanly_where_kvm_is_unusable) {
  if (kvm_usable()) GTEST_SKIP() << "KVM is usable here";
  auto v = create(backend_kind::kvm);
  ASSERT_FALSE(v);
  EXPECT_EQ(v.code(), vcpu_errc::backend_unavailable) << v.err().message();
  // The probe's reason, whichever it was: no /dev/kvm, or one that cannot run the probe guest.
  EXPECT_NE(v.err().detail.find(probe(backend_kind::kvm).reason), std::string::npos)
      << v.err().detail;
}

} // namespace
} // namespace kiln::vcpu
